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
 *
 * Any counter or histogram defined with resty.shmprom can be recorded the
 * same way, without Lua in the log phase:
 *
 *   shmprom_inc     http_requests_total host=$host status=$status;
 *   shmprom_inc     http_sent_bytes_total $bytes_sent host=$host;
 *   shmprom_observe http_request_duration_seconds $request_time host=$host;
 *
 * (http, server, location; a level with none of its own inherits its
 * parent's). The metric is found by name in the zones resty.shmprom's
 * new() opened in init_by_lua (each new() attaches its zone through
 * ngx_http_shmprom_attach); that happens when nginx reads the
 * configuration, after init_by_lua, and a wrong name, kind or label set
 * fails the start or the reload. The lua module runs init_by_lua from its
 * postconfiguration, or, when the configuration has lua_shared_dict
 * zones, once the last of them is initialised: this module finds the
 * metrics from the init of a small shared memory zone of its own, added
 * after theirs, which runs after both (and whose failure makes nginx
 * reject the configuration, as the lua module's does). Label values and
 * the value are nginx complex values evaluated in the log phase of each
 * main request (one variable alone is read by its index, not copied);
 * $request_time alone is read as nginx keeps it, not formatted and parsed.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <math.h>

#include "shmprom.h"


/* attempts of one request handed over; more are not recorded */
#define NGX_HTTP_SHMPROM_MAX_ATTEMPTS  64

/* label values of one shmprom_inc / shmprom_observe */
#define NGX_HTTP_SHMPROM_MAX_LABELS  16

/* longest value text parsed as a number ($bytes_sent and the like) */
#define NGX_HTTP_SHMPROM_MAX_NUMBER  63


/* a label value or a value: text with variables, or one variable alone
 * (read as nginx keeps it: no copy) */
typedef struct {
    ngx_http_complex_value_t    cv;
    ngx_int_t                   index;        /* the variable, or NGX_ERROR */
    ngx_uint_t                  status;       /* it is $status */
} ngx_http_shmprom_value_t;


typedef struct {
    ngx_str_t                   name;
    ngx_http_shmprom_value_t    value;
} ngx_http_shmprom_label_t;


/* one shmprom_inc or shmprom_observe */
typedef struct {
    ngx_str_t                   metric;
    ngx_uint_t                  observe;      /* 0: shmprom_inc */
    ngx_http_shmprom_value_t   *value;        /* NULL: constant */
    double                      constant;
    ngx_uint_t                  request_time; /* the value is $request_time */
    ngx_array_t                 labels;       /* ngx_http_shmprom_label_t */
    u_char                     *file;
    ngx_uint_t                  line;

    /* found after init_by_lua; NULL: not recorded */
    shmprom_rec_hooks          *hooks;
    uint32_t                    family;
    uint32_t                    nlabels;
    ngx_http_shmprom_value_t  **order;        /* in the family's order */
} ngx_http_shmprom_rule_t;


typedef struct {
    /* the recorder's hooks, set by the Lua preset in init_by_lua (the
     * master, before the workers fork): per configuration, so a reload
     * whose configuration fails keeps the running one's */
    shmprom_gw_hooks  hooks;
    /* servers and locations with "shmprom_gateway on" */
    ngx_uint_t        enabled;
    /* the zones' directive recorders attached by resty.shmprom's new()
     * (shmprom_rec_hooks), and every shmprom_inc / shmprom_observe of the
     * configuration (ngx_http_shmprom_rule_t *) */
    ngx_array_t       zones;
    ngx_array_t       rules;
    ngx_pool_t       *pool;
} ngx_http_shmprom_main_conf_t;


typedef struct {
    ngx_flag_t    gateway;
    /* ngx_http_shmprom_rule_t *; NULL: the parent's */
    ngx_array_t  *rules;
} ngx_http_shmprom_loc_conf_t;


static ngx_int_t ngx_http_shmprom_init(ngx_conf_t *cf);
static void *ngx_http_shmprom_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_shmprom_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_shmprom_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_shmprom_gateway(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_shmprom_rule(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_shmprom_resolve(ngx_shm_zone_t *zone, void *data);
static ngx_int_t ngx_http_shmprom_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_shmprom_init_process(ngx_cycle_t *cycle);
static void ngx_http_shmprom_forget(void *data);

int ngx_http_shmprom_gateway_attach(const shmprom_gw_hooks *hooks);
int ngx_http_shmprom_attach(const shmprom_rec_hooks *hooks);


/* the zone whose init finds the directives' metrics */
static ngx_str_t  ngx_http_shmprom_zone_name =
    ngx_string("ngx_http_shmprom_module");


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

    { ngx_string("shmprom_inc"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_shmprom_rule,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("shmprom_observe"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_2MORE,
      ngx_http_shmprom_rule,
      NGX_HTTP_LOC_CONF_OFFSET,
      1,
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


/*
 * Called by resty.shmprom's new() through LuaJIT FFI, in init_by_lua (the
 * master), for each zone it opens. Returns how many shmprom_inc /
 * shmprom_observe the configuration has, or -1 when the hooks are not of
 * the ABI this module was built with (or no configuration is being read).
 */
int
ngx_http_shmprom_attach(const shmprom_rec_hooks *hooks)
{
    ngx_uint_t                     i;
    shmprom_rec_hooks             *h;
    ngx_http_shmprom_main_conf_t  *mcf = ngx_http_shmprom_reading;

    if (mcf == NULL || hooks == NULL || hooks->abi != SHMPROM_ABI_VERSION
        || hooks->rec == NULL || hooks->find == NULL || hooks->label == NULL
        || hooks->record == NULL)
    {
        return -1;
    }

    h = mcf->zones.elts;
    for (i = 0; i < mcf->zones.nelts; i++) {
        if (h[i].rec == hooks->rec) {
            return (int) mcf->rules.nelts;
        }
    }

    h = ngx_array_push(&mcf->zones);
    if (h == NULL) {
        return -1;
    }

    *h = *hooks;

    /* the caller's string lives only for the call */
    h->zone = NULL;
    h->zone_len = 0;

    if (hooks->zone && hooks->zone_len) {
        h->zone = ngx_pnalloc(mcf->pool, hooks->zone_len);
        if (h->zone == NULL) {
            mcf->zones.nelts--;
            return -1;
        }

        ngx_memcpy((char *) h->zone, hooks->zone, hooks->zone_len);
        h->zone_len = hooks->zone_len;
    }

    return (int) mcf->rules.nelts;
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

    if (ngx_array_init(&mcf->zones, cf->pool, 2, sizeof(shmprom_rec_hooks))
        != NGX_OK
        || ngx_array_init(&mcf->rules, cf->pool, 4,
                          sizeof(ngx_http_shmprom_rule_t *))
           != NGX_OK)
    {
        return NULL;
    }

    mcf->pool = cf->pool;

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
    /* conf->rules = NULL: the parent's */

    return conf;
}


static char *
ngx_http_shmprom_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_shmprom_loc_conf_t  *prev = parent;
    ngx_http_shmprom_loc_conf_t  *conf = child;

    ngx_conf_merge_value(conf->gateway, prev->gateway, 0);

    if (conf->rules == NULL) {
        conf->rules = prev->rules;
    }

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


/* [a-zA-Z0-9_]+: a variable's name; a label name when it does not start
 * with a digit */
static ngx_uint_t
ngx_http_shmprom_word(u_char *p, size_t len)
{
    size_t  i;

    if (len == 0) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (!((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= 'A' && p[i] <= 'Z')
              || (p[i] >= '0' && p[i] <= '9') || p[i] == '_'))
        {
            return 0;
        }
    }

    return 1;
}


/* the number in (p, len), all of it; NaN when it is not one */
static double
ngx_http_shmprom_number(u_char *p, size_t len)
{
    char    *end;
    double   v;
    u_char   buf[NGX_HTTP_SHMPROM_MAX_NUMBER + 1];

    if (len == 0 || len > NGX_HTTP_SHMPROM_MAX_NUMBER) {
        return NAN;
    }

    ngx_memcpy(buf, p, len);
    buf[len] = '\0';

    v = strtod((char *) buf, &end);

    if (end != (char *) buf + len) {
        return NAN;
    }

    return v;
}


/* compiles `text`: one variable alone is read by its index */
static ngx_int_t
ngx_http_shmprom_compile(ngx_conf_t *cf, ngx_str_t *text,
    ngx_http_shmprom_value_t *v)
{
    ngx_str_t                          name;
    ngx_http_compile_complex_value_t   ccv;

    v->index = NGX_ERROR;
    v->status = 0;

    if (text->len > 1 && text->data[0] == '$') {
        name.data = text->data + 1;
        name.len = text->len - 1;

        if (ngx_http_shmprom_word(name.data, name.len)) {
            /* $status: formatted here, not by nginx's handler (which
             * prints it with ngx_sprintf into the request's pool on every
             * read) */
            v->status = (name.len == sizeof("status") - 1
                         && ngx_strncmp(name.data, "status", name.len) == 0);

            v->index = ngx_http_get_variable_index(cf, &name);
            if (v->index == NGX_ERROR) {
                return NGX_ERROR;
            }

            return NGX_OK;
        }
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));
    ccv.cf = cf;
    ccv.value = text;
    ccv.complex_value = &v->cv;

    return ngx_http_compile_complex_value(&ccv);
}


/* the text of a compiled value for this request (a variable nginx does not
 * have for it: empty); $status goes into buf (3 bytes) */
static ngx_int_t
ngx_http_shmprom_eval(ngx_http_request_t *r, ngx_http_shmprom_value_t *v,
    ngx_str_t *out, u_char *buf)
{
    ngx_uint_t                  status;
    ngx_http_variable_value_t  *vv;

    if (v->status) {
        /* as $status: "%03ui" of the first of these that is set */
        if (r->err_status) {
            status = r->err_status;

        } else if (r->headers_out.status) {
            status = r->headers_out.status;

        } else if (r->http_version == NGX_HTTP_VERSION_9) {
            status = 9;

        } else {
            status = 0;
        }

        if (status <= 999) {
            buf[0] = (u_char) ('0' + status / 100);
            buf[1] = (u_char) ('0' + status / 10 % 10);
            buf[2] = (u_char) ('0' + status % 10);
            out->data = buf;
            out->len = 3;
            return NGX_OK;
        }

        /* never seen: nginx's own formatting then */
    }

    if (v->index == NGX_ERROR) {
        return ngx_http_complex_value(r, &v->cv, out);
    }

    vv = ngx_http_get_flushed_variable(r, v->index);

    if (vv == NULL || vv->not_found) {
        ngx_str_null(out);
        return NGX_OK;
    }

    out->data = vv->data;
    out->len = vv->len;

    return NGX_OK;
}


/*
 * shmprom_inc metric [value] [label=value ...];
 * shmprom_observe metric value [label=value ...];
 */
static char *
ngx_http_shmprom_rule(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_shmprom_loc_conf_t  *lcf = conf;

    u_char                            *eq;
    ngx_str_t                         *args, *value, name, text;
    ngx_uint_t                         i, j;
    ngx_http_shmprom_rule_t           *rule, **rp;
    ngx_http_shmprom_label_t          *label, *labels;
    ngx_http_shmprom_main_conf_t      *mcf;

    args = cf->args->elts;

    rule = ngx_pcalloc(cf->pool, sizeof(ngx_http_shmprom_rule_t));
    if (rule == NULL) {
        return NGX_CONF_ERROR;
    }

    rule->metric = args[1];
    rule->observe = cmd->offset;
    rule->constant = 1;
    rule->file = cf->conf_file->file.name.data;
    rule->line = cf->conf_file->line;

    if (ngx_array_init(&rule->labels, cf->pool, 4,
                       sizeof(ngx_http_shmprom_label_t))
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    value = NULL;

    for (i = 2; i < cf->args->nelts; i++) {
        eq = ngx_strlchr(args[i].data, args[i].data + args[i].len, '=');

        if (eq == NULL
            || !ngx_http_shmprom_word(args[i].data, eq - args[i].data)
            || (args[i].data[0] >= '0' && args[i].data[0] <= '9'))
        {
            if (value) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%V\" takes one value, then "
                                   "label=value pairs: \"%V\" is a second "
                                   "value", &cmd->name, &args[i]);
                return NGX_CONF_ERROR;
            }

            value = &args[i];
            continue;
        }

        name.data = args[i].data;
        name.len = eq - args[i].data;
        text.data = eq + 1;
        text.len = args[i].len - name.len - 1;

        labels = rule->labels.elts;
        for (j = 0; j < rule->labels.nelts; j++) {
            if (labels[j].name.len == name.len
                && ngx_strncmp(labels[j].name.data, name.data, name.len) == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%V\": label \"%V\" given twice",
                                   &cmd->name, &name);
                return NGX_CONF_ERROR;
            }
        }

        if (rule->labels.nelts == NGX_HTTP_SHMPROM_MAX_LABELS) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\": more than %d labels",
                               &cmd->name, NGX_HTTP_SHMPROM_MAX_LABELS);
            return NGX_CONF_ERROR;
        }

        label = ngx_array_push(&rule->labels);
        if (label == NULL) {
            return NGX_CONF_ERROR;
        }

        label->name = name;

        if (ngx_http_shmprom_compile(cf, &text, &label->value) != NGX_OK) {
            return NGX_CONF_ERROR;
        }
    }

    if (value == NULL && rule->observe) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" needs a value to observe, such as "
                           "$request_time", &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (value && value->len == sizeof("$request_time") - 1
        && ngx_strncmp(value->data, "$request_time", value->len) == 0)
    {
        rule->request_time = 1;

    } else if (value && ngx_strlchr(value->data, value->data + value->len,
                                    '$'))
    {
        rule->value = ngx_palloc(cf->pool, sizeof(ngx_http_shmprom_value_t));
        if (rule->value == NULL) {
            return NGX_CONF_ERROR;
        }

        if (ngx_http_shmprom_compile(cf, value, rule->value) != NGX_OK) {
            return NGX_CONF_ERROR;
        }

    } else if (value) {
        rule->constant = ngx_http_shmprom_number(value->data, value->len);

        if (!isfinite(rule->constant)
            || (!rule->observe && rule->constant < 0))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\": \"%V\" is not a %s, nor a label=value "
                               "pair", &cmd->name, value,
                               rule->observe ? "finite number"
                                             : "finite number >= 0");
            return NGX_CONF_ERROR;
        }
    }

    if (lcf->rules == NULL) {
        lcf->rules = ngx_array_create(cf->pool, 2,
                                      sizeof(ngx_http_shmprom_rule_t *));
        if (lcf->rules == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    rp = ngx_array_push(lcf->rules);
    if (rp == NULL) {
        return NGX_CONF_ERROR;
    }

    *rp = rule;

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_shmprom_module);

    rp = ngx_array_push(&mcf->rules);
    if (rp == NULL) {
        return NGX_CONF_ERROR;
    }

    *rp = rule;

    return NGX_CONF_OK;
}


/* an error of one directive, with its place in the configuration */
static ngx_int_t
ngx_http_shmprom_rule_error(ngx_log_t *log, ngx_http_shmprom_rule_t *rule,
    const char *what, ngx_str_t *detail)
{
    ngx_log_error(NGX_LOG_EMERG, log, 0,
                  "%s \"%V\": %s%V in %s:%ui",
                  rule->observe ? "shmprom_observe" : "shmprom_inc",
                  &rule->metric, what, detail, rule->file, rule->line);

    return NGX_ERROR;
}


/*
 * Finds every directive's metric in the zones attached during init_by_lua
 * and puts its label values in the family's order: the init of this
 * module's shared memory zone (see ngx_http_shmprom_init), in the process
 * reading the configuration, after init_by_lua.
 */
static ngx_int_t
ngx_http_shmprom_resolve(ngx_shm_zone_t *shm, void *data)
{
    int                            rc;
    ngx_log_t                     *log = shm->shm.log;
    ngx_str_t                      none = ngx_null_string, zone, other;
    ngx_uint_t                     i, j, k, found;
    shmprom_str                    lname;
    shmprom_rec_hooks             *zones;
    shmprom_rec_family             fam, f;
    ngx_http_shmprom_rule_t      **rules, *rule;
    ngx_http_shmprom_label_t      *labels;
    ngx_http_shmprom_main_conf_t  *mcf = shm->data;

    ngx_memzero(&fam, sizeof(shmprom_rec_family));

    /* the lua module does not run init_by_lua for "nginx -t": no zone is
     * attached then, nothing to check */
    if (ngx_test_config) {
        return NGX_OK;
    }

    rules = mcf->rules.elts;
    zones = mcf->zones.elts;

    for (i = 0; i < mcf->rules.nelts; i++) {
        rule = rules[i];
        found = NGX_CONF_UNSET_UINT;

        for (j = 0; j < mcf->zones.nelts; j++) {
            rc = zones[j].find(zones[j].rec, (const char *) rule->metric.data,
                               rule->metric.len, &f);
            if (rc != 0) {
                continue;
            }

            if (found != NGX_CONF_UNSET_UINT) {
                zone.data = (u_char *) zones[found].zone;
                zone.len = zones[found].zone_len;
                other.data = (u_char *) zones[j].zone;
                other.len = zones[j].zone_len;
                ngx_log_error(NGX_LOG_EMERG, log, 0,
                              "%s \"%V\": defined in zones \"%V\" and "
                              "\"%V\": the name must be one zone's, in "
                              "%s:%ui",
                              rule->observe ? "shmprom_observe"
                                            : "shmprom_inc",
                              &rule->metric, &zone, &other, rule->file,
                              rule->line);
                return NGX_ERROR;
            }

            found = j;
            fam = f;
        }

        if (found == NGX_CONF_UNSET_UINT) {
            return ngx_http_shmprom_rule_error(log, rule,
                "no such metric in the zones of resty.shmprom's new() "
                "(define it in init_by_lua)", &none);
        }

        if (rule->observe && fam.kind != 2) {
            return ngx_http_shmprom_rule_error(log, rule,
                "is not a histogram", &none);
        }

        if (!rule->observe && fam.kind != 0) {
            return ngx_http_shmprom_rule_error(log, rule,
                "is not a counter", &none);
        }

        if (fam.nlabels > NGX_HTTP_SHMPROM_MAX_LABELS) {
            return ngx_http_shmprom_rule_error(log, rule,
                "has more labels than a directive takes", &none);
        }

        rule->order = ngx_pcalloc(mcf->pool, (fam.nlabels + 1)
                                  * sizeof(ngx_http_shmprom_value_t *));
        if (rule->order == NULL) {
            return NGX_ERROR;
        }

        labels = rule->labels.elts;

        for (k = 0; k < fam.nlabels; k++) {
            if (zones[found].label(zones[found].rec, fam.id, (uint32_t) k,
                                   &lname)
                != 0)
            {
                return NGX_ERROR;
            }

            for (j = 0; j < rule->labels.nelts; j++) {
                if (labels[j].name.len == lname.len
                    && ngx_strncmp(labels[j].name.data, lname.data,
                                   lname.len) == 0)
                {
                    rule->order[k] = &labels[j].value;
                    break;
                }
            }

            if (rule->order[k] == NULL) {
                other.data = (u_char *) lname.data;
                other.len = lname.len;
                return ngx_http_shmprom_rule_error(log, rule,
                    "no value for its label ", &other);
            }
        }

        if (rule->labels.nelts != fam.nlabels) {
            /* a name the family does not have */
            for (j = 0; j < rule->labels.nelts; j++) {
                for (k = 0; k < fam.nlabels; k++) {
                    if (rule->order[k] == &labels[j].value) {
                        break;
                    }
                }

                if (k == fam.nlabels) {
                    return ngx_http_shmprom_rule_error(log, rule,
                        "has no label ", &labels[j].name);
                }
            }
        }

        rule->hooks = &zones[found];
        rule->family = fam.id;
        rule->nlabels = fam.nlabels;
    }

    return NGX_OK;
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


/* as $request_time, in seconds */
static double
ngx_http_shmprom_request_time(ngx_http_request_t *r)
{
    ngx_time_t      *tp;
    ngx_msec_int_t   ms;

    tp = ngx_timeofday();
    ms = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                           + (tp->msec - r->start_msec));

    return (double) ngx_max(ms, 0) / 1000.0;
}


/* log phase: the shmprom_inc / shmprom_observe of the location */
static void
ngx_http_shmprom_record_rules(ngx_http_request_t *r, ngx_array_t *rules)
{
    double                     v;
    u_char                     buf[NGX_HTTP_SHMPROM_MAX_LABELS + 1][4];
    ngx_str_t                  s;
    ngx_uint_t                 i, k;
    shmprom_str                values[NGX_HTTP_SHMPROM_MAX_LABELS];
    ngx_http_shmprom_rule_t  **rp, *rule;

    rp = rules->elts;

    for (i = 0; i < rules->nelts; i++) {
        rule = rp[i];

        if (rule->hooks == NULL) {
            continue;
        }

        for (k = 0; k < rule->nlabels; k++) {
            if (ngx_http_shmprom_eval(r, rule->order[k], &s, buf[k])
                != NGX_OK)
            {
                break;
            }

            values[k].data = (const char *) s.data;
            values[k].len = s.len;
        }

        if (k < rule->nlabels) {
            /* out of memory: not recorded */
            continue;
        }

        if (rule->request_time) {
            v = ngx_http_shmprom_request_time(r);

        } else if (rule->value) {
            if (ngx_http_shmprom_eval(r, rule->value, &s,
                                      buf[NGX_HTTP_SHMPROM_MAX_LABELS])
                != NGX_OK)
            {
                continue;
            }

            /* not a number ("-", empty): NaN, refused and counted */
            v = ngx_http_shmprom_number(s.data, s.len);

        } else {
            v = rule->constant;
        }

        rule->hooks->record(rule->hooks->rec, rule->family, v, rule->nlabels,
                            values);
    }
}


/* log phase: the request's facts to the recorders */
static ngx_int_t
ngx_http_shmprom_log_handler(ngx_http_request_t *r)
{
    off_t                         sent;
    ngx_table_elt_t              *depth;
    shmprom_gw_request            req;
    shmprom_gw_attempt            attempts[NGX_HTTP_SHMPROM_MAX_ATTEMPTS];
    ngx_http_shmprom_loc_conf_t   *lcf;
    ngx_http_shmprom_main_conf_t  *mcf;

    if (r != r->main) {
        return NGX_OK;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_shmprom_module);

    if (lcf->rules) {
        ngx_http_shmprom_record_rules(r, lcf->rules);
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_shmprom_module);
    if (mcf->hooks.record == NULL || !lcf->gateway) {
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

    req.duration = ngx_http_shmprom_request_time(r);

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
    ngx_shm_zone_t                *zone;
    ngx_http_handler_pt           *h;
    ngx_http_core_main_conf_t     *cmcf;
    ngx_http_shmprom_main_conf_t  *mcf;

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_shmprom_module);

    if (mcf->rules.nelts) {
        /*
         * Not for memory: its init runs after init_by_lua (which the lua
         * module runs from its postconfiguration, or from the init of the
         * last of its lua_shared_dict zones, all added before this one),
         * and a failed init rejects the configuration.
         */
        zone = ngx_shared_memory_add(cf, &ngx_http_shmprom_zone_name,
                                     8 * ngx_pagesize,
                                     &ngx_http_shmprom_module);
        if (zone == NULL) {
            return NGX_ERROR;
        }

        zone->init = ngx_http_shmprom_resolve;
        zone->data = mcf;
    }

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
