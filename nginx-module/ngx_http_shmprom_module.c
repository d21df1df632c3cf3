/*
 * ngx_http_shmprom_module: the file-system gateway preset of shmprom,
 * recorded from C instead of Lua phase handlers.
 *
 *   load_module /path/to/ngx_http_shmprom_module.so;
 *   ...
 *   server {
 *       shmprom_gateway on;      # the gateway server
 *       ...
 *   }
 *
 * The metric families, the zone and the storage-node probes stay with
 * resty.shmprom.gateway: its init() (init_by_lua) defines them and hands
 * this module the recorder's hooks through ngx_http_shmprom_gateway_attach
 * (LuaJIT FFI; nginx loads modules RTLD_GLOBAL). From then on, for every
 * request of a server or location with "shmprom_gateway on":
 *
 *   - the post-read phase counts it in flight, and a cleanup of the
 *     request's pool takes it out again (internal redirects do not run the
 *     post-read phase again; requests nginx rejects while reading the
 *     header never reach it);
 *   - the log phase hands its facts to the recorder (libshmprom): method,
 *     Depth header (PROPFIND), status, request time, bytes, the upstream
 *     attempts. Subrequests are not recorded.
 *
 * What is recorded is what gateway.log() records in Lua; this module only
 * reads what nginx keeps for $status, $request_time, $request_length,
 * $bytes_sent, $body_bytes_sent, $request_completion, $content_length and
 * $upstream_addr / $upstream_status / $upstream_response_time, without
 * formatting those variables.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "shmprom.h"


/* attempts of one request handed over; more are not recorded */
#define NGX_HTTP_SHMPROM_MAX_ATTEMPTS  64


typedef struct {
    /* the recorder's hooks, set by the Lua preset in init_by_lua (the
     * master, before the workers fork): per configuration, so a reload
     * whose configuration fails keeps the running one's */
    shmprom_gw_hooks  hooks;
    /* servers and locations with "shmprom_gateway on" */
    ngx_uint_t        enabled;
} ngx_http_shmprom_main_conf_t;


typedef struct {
    ngx_flag_t  gateway;
} ngx_http_shmprom_loc_conf_t;


static ngx_int_t ngx_http_shmprom_init(ngx_conf_t *cf);
static void *ngx_http_shmprom_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_shmprom_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_shmprom_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_shmprom_gateway(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_shmprom_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_shmprom_init_process(ngx_cycle_t *cycle);
static void ngx_http_shmprom_forget(void *data);

int ngx_http_shmprom_gateway_attach(const shmprom_gw_hooks *hooks);


/* the main configuration of the http block being read (init_by_lua runs
 * while it is, from the lua module's postconfiguration) */
static ngx_http_shmprom_main_conf_t  *ngx_http_shmprom_reading;


static ngx_command_t  ngx_http_shmprom_commands[] = {

    { ngx_string("shmprom_gateway"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_http_shmprom_gateway,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_shmprom_loc_conf_t, gateway),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_shmprom_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_shmprom_init,                 /* postconfiguration */

    ngx_http_shmprom_create_main_conf,     /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_shmprom_create_loc_conf,      /* create location configuration */
    ngx_http_shmprom_merge_loc_conf        /* merge location configuration */
};


ngx_module_t  ngx_http_shmprom_module = {
    NGX_MODULE_V1,
    &ngx_http_shmprom_module_ctx,          /* module context */
    ngx_http_shmprom_commands,             /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_shmprom_init_module,          /* init module */
    ngx_http_shmprom_init_process,         /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/*
 * Called by resty.shmprom.gateway's init() through LuaJIT FFI, in
 * init_by_lua (the master, before the workers fork). Returns how many
 * servers and locations of the configuration have "shmprom_gateway on"
 * (0: the Lua phase handlers record), or -1 when the hooks are not of the
 * ABI this module was built with.
 */
int
ngx_http_shmprom_gateway_attach(const shmprom_gw_hooks *hooks)
{
    ngx_http_shmprom_main_conf_t  *mcf = ngx_http_shmprom_reading;

    if (mcf == NULL || hooks == NULL || hooks->abi != SHMPROM_ABI_VERSION
        || hooks->gw == NULL || hooks->begin == NULL || hooks->end == NULL
        || hooks->record == NULL)
    {
        return -1;
    }

    mcf->hooks = *hooks;

    return (int) mcf->enabled;
}


static void *
ngx_http_shmprom_create_main_conf(ngx_conf_t *cf)
{
    ngx_pool_cleanup_t            *cln;
    ngx_http_shmprom_main_conf_t  *mcf;

    /* zeroed: no hooks until the Lua preset attaches */
    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_shmprom_main_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    /* a configuration that fails takes its pool with it */
    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    cln->handler = ngx_http_shmprom_forget;
    cln->data = mcf;

    ngx_http_shmprom_reading = mcf;

    return mcf;
}


static void
ngx_http_shmprom_forget(void *data)
{
    if (ngx_http_shmprom_reading == data) {
        ngx_http_shmprom_reading = NULL;
    }
}


static ngx_int_t
ngx_http_shmprom_init_module(ngx_cycle_t *cycle)
{
    /* the configuration is read: attaching is over */
    ngx_http_shmprom_reading = NULL;

    return NGX_OK;
}


static void *
ngx_http_shmprom_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_shmprom_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_shmprom_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->gateway = NGX_CONF_UNSET;

    return conf;
}


static char *
ngx_http_shmprom_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_shmprom_loc_conf_t  *prev = parent;
    ngx_http_shmprom_loc_conf_t  *conf = child;

    ngx_conf_merge_value(conf->gateway, prev->gateway, 0);

    return NGX_CONF_OK;
}


static char *
ngx_http_shmprom_gateway(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_shmprom_loc_conf_t   *lcf = conf;
    ngx_http_shmprom_main_conf_t  *mcf;
    char                          *rv;

    rv = ngx_conf_set_flag_slot(cf, cmd, conf);

    if (rv == NGX_CONF_OK && lcf->gateway) {
        mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_shmprom_module);
        mcf->enabled++;
    }

    return rv;
}


static ngx_int_t
ngx_http_shmprom_init_process(ngx_cycle_t *cycle)
{
    ngx_http_shmprom_main_conf_t  *mcf;

    if (cycle->conf_ctx[ngx_http_module.index] == NULL) {
        return NGX_OK;
    }

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_shmprom_module);

    if (mcf && mcf->enabled && mcf->hooks.record == NULL) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                      "shmprom_gateway is on but resty.shmprom.gateway's "
                      "init() did not attach (call it in init_by_lua): "
                      "nothing is recorded");
    }

    return NGX_OK;
}


static void
ngx_http_shmprom_end(void *data)
{
    shmprom_gw_hooks  *hooks = data;

    hooks->end(hooks->gw);
}


/* post-read phase: one more request in flight until its pool goes */
static ngx_int_t
ngx_http_shmprom_begin_handler(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t            *cln;
    ngx_http_shmprom_loc_conf_t   *lcf;
    ngx_http_shmprom_main_conf_t  *mcf;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_shmprom_module);
    if (mcf->hooks.begin == NULL || r != r->main) {
        return NGX_DECLINED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_shmprom_module);
    if (!lcf->gateway) {
        return NGX_DECLINED;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        /* not counted in flight; the request goes on */
        return NGX_DECLINED;
    }

    cln->handler = ngx_http_shmprom_end;
    cln->data = &mcf->hooks;

    mcf->hooks.begin(mcf->hooks.gw);

    return NGX_DECLINED;
}


/* the Depth request header, or NULL */
static ngx_table_elt_t *
ngx_http_shmprom_depth(ngx_http_request_t *r)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash == 0) {
            continue;
        }

        if (h[i].key.len == sizeof("Depth") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "Depth",
                               sizeof("Depth") - 1) == 0)
        {
            return &h[i];
        }
    }
}


/*
 * The attempts of $upstream_addr: an entry per upstream state, a state
 * without a peer separating the upstream groups (" : "); an attempt is
 * retried when another one follows in the same group (", ").
 */
static uint32_t
ngx_http_shmprom_attempts(ngx_http_request_t *r, shmprom_gw_attempt *out)
{
    uint32_t                    n;
    ngx_uint_t                  i, len;
    ngx_http_upstream_state_t  *state;

    if (r->upstream_states == NULL || r->upstream_states->nelts == 0) {
        return 0;
    }

    state = r->upstream_states->elts;
    len = r->upstream_states->nelts;
    n = 0;

    for (i = 0; i < len && n < NGX_HTTP_SHMPROM_MAX_ATTEMPTS; i++) {

        if (state[i].peer == NULL) {
            /* a group separator (or a group that never picked a peer) */
            continue;
        }

        out[n].node = (const char *) state[i].peer->data;
        out[n].node_len = state[i].peer->len;
        out[n].status = (uint32_t) state[i].status;
        out[n].retried = (i + 1 < len && state[i + 1].peer != NULL);
        out[n].time = state[i].response_time == (ngx_msec_t) -1
                      ? -1.0
                      : (double) ngx_max((ngx_msec_int_t)
                                         state[i].response_time, 0)
                        / 1000.0;
        n++;
    }

    return n;
}


/* log phase: the request's facts to the recorder */
static ngx_int_t
ngx_http_shmprom_log_handler(ngx_http_request_t *r)
{
    off_t                         sent;
    ngx_time_t                   *tp;
    ngx_msec_int_t                ms;
    ngx_table_elt_t              *depth;
    shmprom_gw_request            req;
    shmprom_gw_attempt            attempts[NGX_HTTP_SHMPROM_MAX_ATTEMPTS];
    ngx_http_shmprom_loc_conf_t   *lcf;
    ngx_http_shmprom_main_conf_t  *mcf;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_shmprom_module);
    if (mcf->hooks.record == NULL || r != r->main) {
        return NGX_OK;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_shmprom_module);
    if (!lcf->gateway) {
        return NGX_OK;
    }

    req.method = (const char *) r->method_name.data;
    req.method_len = r->method_name.len;
    req.depth = NULL;
    req.depth_len = 0;

    if (r->method == NGX_HTTP_PROPFIND) {
        depth = ngx_http_shmprom_depth(r);
        if (depth) {
            req.depth = (const char *) depth->value.data;
            req.depth_len = depth->value.len;
        }
    }

    /* as $status */
    if (r->err_status) {
        req.status = (uint32_t) r->err_status;

    } else if (r->headers_out.status) {
        req.status = (uint32_t) r->headers_out.status;

    } else if (r->http_version == NGX_HTTP_VERSION_9) {
        req.status = 9;

    } else {
        req.status = 0;
    }

    /* as $request_time */
    tp = ngx_timeofday();
    ms = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                           + (tp->msec - r->start_msec));
    req.duration = (double) ngx_max(ms, 0) / 1000.0;

    /* as $request_length, $bytes_sent, $body_bytes_sent */
    sent = r->connection->sent;
    req.received = r->request_length > 0 ? (uint64_t) r->request_length : 0;
    req.sent = sent > 0 ? (uint64_t) sent : 0;
    sent -= r->header_size;
    req.body_sent = sent > 0 ? (uint64_t) sent : 0;

    req.complete = r->request_complete;
    req.content_length = r->headers_in.content_length_n;

    req.nattempts = ngx_http_shmprom_attempts(r, attempts);
    req.attempts = attempts;

    mcf->hooks.record(mcf->hooks.gw, &req);

    return NGX_OK;
}


static ngx_int_t
ngx_http_shmprom_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_POST_READ_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_shmprom_begin_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_shmprom_log_handler;

    return NGX_OK;
}
