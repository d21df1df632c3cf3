//! The C header and the Rust ABI agree: bindgen's reading of
//! include/shmprom.h matches the `extern "C"` functions in src/ffi, the
//! library exports exactly the header's symbols (all prefixed shmprom_),
//! the Lua cdefs are the header's text, and a C program built against the
//! header works.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn norm(t: &str) -> String {
    t.replace("::std::os::raw::", "")
        .replace("::std::ffi::", "")
        .replace("std::ffi::", "")
        .replace("libc::", "")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("* ", "*")
        .trim()
        .trim_end_matches(',')
        .to_string()
}

/// Extracts `fn shmprom_x(args) -> ret` signatures: name -> (arg types, ret).
fn signatures(src: &str) -> BTreeMap<String, (Vec<String>, String)> {
    let mut out = BTreeMap::new();
    let mut rest = src;
    while let Some(i) = rest.find("fn shmprom_") {
        rest = &rest[i + 3..];
        let open = rest.find('(').unwrap();
        let name = rest[..open].trim().to_string();
        let close = rest.find(')').unwrap();
        let args: Vec<String> = rest[open + 1..close]
            .split(',')
            .filter(|a| !a.trim().is_empty())
            .map(|a| norm(a.split_once(':').map(|x| x.1).unwrap_or(a)))
            .collect();
        let after = &rest[close + 1..];
        let end = after.find(['{', ';']).unwrap();
        let ret = norm(after[..end].trim().trim_start_matches("->"));
        out.insert(name, (args, ret));
        rest = &after[end..];
    }
    out
}

/// bindgen's Rust rendering of include/shmprom.h.
fn bindings() -> String {
    let header = repo().join("include/shmprom.h");
    bindgen::Builder::default()
        .header(header.to_str().unwrap())
        .allowlist_function("shmprom_.*")
        .allowlist_type("shmprom_.*")
        .allowlist_var("SHMPROM_.*")
        .layout_tests(false)
        .generate()
        .expect("bindgen reads the header")
        .to_string()
}

/// The fields of `pub struct name { ... }` in Rust source, normalised.
fn struct_fields(src: &str, name: &str) -> Vec<String> {
    let Some(i) = src.find(&format!("pub struct {name} {{")) else {
        return Vec::new();
    };
    let s = &src[i..];
    let s = &s[..s.find('}').unwrap()];
    s.lines()
        .skip(1)
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter(|l| l.contains(':'))
        .map(norm)
        .collect()
}

/// The right-hand side of `pub type name = ...;`, normalised.
fn type_alias(src: &str, name: &str) -> String {
    let i = src
        .find(&format!("pub type {name} ="))
        .unwrap_or_else(|| panic!("type {name}"));
    let s = &src[i..];
    let s = &s[s.find('=').unwrap() + 1..s.find(';').unwrap()];
    norm(s)
        .replace(":: std :: option :: ", "")
        .replace("::std::option::", "")
        .replace(" < ", "<")
        .replace(" >", ">")
}

/// sizeof of the header's structs, from bindgen's layout checks.
fn c_sizes() -> BTreeMap<String, usize> {
    let header = repo().join("include/shmprom.h");
    let text = bindgen::Builder::default()
        .header(header.to_str().unwrap())
        .allowlist_type("shmprom_.*")
        .layout_tests(true)
        .generate()
        .expect("bindgen reads the header")
        .to_string();
    let mut out = BTreeMap::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("[\"Size of ") {
        rest = &rest[i + 10..];
        let name = rest[..rest.find('"').unwrap()].to_string();
        let m = rest.find("() - ").unwrap();
        let digits: String = rest[m + 5..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        out.insert(name, digits.parse().unwrap());
    }
    out
}

fn rust_size(name: &str) -> usize {
    use shmprom::ffi::*;
    match name {
        "shmprom_zone_info" => std::mem::size_of::<shmprom_zone_info>(),
        "shmprom_gw_attempt" => std::mem::size_of::<shmprom_gw_attempt>(),
        "shmprom_gw_request" => std::mem::size_of::<shmprom_gw_request>(),
        "shmprom_gw_hooks" => std::mem::size_of::<shmprom_gw_hooks>(),
        "shmprom_str" => std::mem::size_of::<shmprom_str>(),
        "shmprom_rec_family" => std::mem::size_of::<shmprom_rec_family>(),
        "shmprom_rec_hooks" => std::mem::size_of::<shmprom_rec_hooks>(),
        _ => unreachable!("{name}"),
    }
}

#[test]
fn header_matches_rust() {
    let bindings = bindings();
    let c = signatures(&bindings);
    let rust_src = ["src/ffi/mod.rs", "src/ffi/gateway.rs", "src/ffi/rules.rs"]
        .map(|f| std::fs::read_to_string(repo().join(f)).unwrap())
        .concat();
    let r = signatures(&rust_src);
    assert!(!c.is_empty());
    assert_eq!(
        c.keys().collect::<Vec<_>>(),
        r.keys().collect::<Vec<_>>(),
        "header and src/ffi declare different functions"
    );
    for (name, (cargs, cret)) in &c {
        let (rargs, rret) = &r[name];
        assert_eq!(cargs, rargs, "{name}: argument types differ (C vs Rust)");
        assert_eq!(cret, rret, "{name}: return types differ");
    }
    // the structs LuaJIT and the nginx module read: same fields, same
    // types, same order, same size as C lays them out
    let sizes = c_sizes();
    for name in [
        "shmprom_zone_info",
        "shmprom_gw_attempt",
        "shmprom_gw_request",
        "shmprom_gw_hooks",
        "shmprom_str",
        "shmprom_rec_family",
        "shmprom_rec_hooks",
    ] {
        let fields = struct_fields(&bindings, name);
        assert!(!fields.is_empty(), "{name} in the header");
        assert_eq!(fields, struct_fields(&rust_src, name), "{name} differs");
        let c_size = *sizes
            .get(name)
            .unwrap_or_else(|| panic!("C size of {name}"));
        assert_eq!(rust_size(name), c_size, "{name}: size as C lays it out");
    }
    assert_eq!(
        struct_fields(&bindings, "shmprom_zone_info"),
        vec![
            "cells: *mut f64",
            "plane_stride: u64",
            "epoch: *const u32",
            "planes: u32",
            "abi: u32"
        ]
    );
    // the hooks' function pointer types
    for alias in [
        "shmprom_gw_fn",
        "shmprom_gw_record_fn",
        "shmprom_rec_find_fn",
        "shmprom_rec_label_fn",
        "shmprom_rec_record_fn",
    ] {
        assert_eq!(
            type_alias(&bindings, alias),
            type_alias(&rust_src, alias),
            "{alias} differs"
        );
    }
    assert!(bindings.contains("pub const SHMPROM_ABI_VERSION: u32 = 8;"));
    assert_eq!(shmprom::ffi::SHMPROM_ABI_VERSION, 8);
}

#[test]
fn exported_symbols_are_the_header() {
    let lib = repo().join("target/release/libshmprom.so");
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .expect("nm (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            let (_, kind, name) = (p.next()?, p.next()?, p.next()?);
            (kind == "T").then_some(name)
        })
        .collect();
    let declared = signatures(&bindings());
    for e in &exported {
        assert!(e.starts_with("shmprom_"), "unprefixed export {e}");
        assert!(
            declared.contains_key(*e),
            "{e} exported but not in the header"
        );
    }
    for d in declared.keys() {
        assert!(
            exported.contains(&d.as_str()),
            "{d} declared but not exported"
        );
    }
}

#[test]
fn lua_cdefs_are_the_header() {
    let header = std::fs::read_to_string(repo().join("include/shmprom.h")).unwrap();
    let body = header
        .split("/* SHMPROM_CDEF_BEGIN */\n")
        .nth(1)
        .unwrap()
        .split("/* SHMPROM_CDEF_END */")
        .next()
        .unwrap();
    let lua = std::fs::read_to_string(repo().join("lua/resty/shmprom/cdefs.lua")).unwrap();
    assert!(
        lua.contains(&format!("_M.text = [[\n{body}]]")),
        "lua/resty/shmprom/cdefs.lua is stale: run `make cdefs`"
    );
}

#[test]
fn c_program_uses_the_library() {
    let root = repo();
    let tmp = std::env::temp_dir().join(format!("shmprom-smoke-{}", std::process::id()));
    let compiler = cc::Build::new()
        .opt_level(0)
        .host("x86_64-unknown-linux-gnu")
        .target("x86_64-unknown-linux-gnu")
        .cargo_metadata(false)
        .get_compiler();
    let st = compiler
        .to_command()
        .arg("-Wall")
        .arg("-Werror")
        .arg("-D_GNU_SOURCE")
        .arg(format!("-I{}", root.join("include").display()))
        .arg(root.join("tests/c/smoke.c"))
        .arg(format!("-L{}", root.join("target/release").display()))
        .arg("-lshmprom")
        .arg("-o")
        .arg(&tmp)
        .status()
        .unwrap();
    assert!(st.success(), "C program compiles against the header");
    let out = Command::new(&tmp)
        .env("LD_LIBRARY_PATH", root.join("target/release"))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&tmp);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}
