//! The Lua wrapper, in process: mlua's vendored LuaJIT loads
//! lua/resty/shmprom.lua, which ffi.loads target/release/libshmprom.so
//! (built by `make build`), and runs tests/lua/*.lua.

use mlua::{Lua, LuaOptions, StdLib};
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(script: &str) {
    let root = repo();
    let lib = root.join("target/release/libshmprom.so");
    assert!(
        lib.exists(),
        "build the library first: cargo build --release"
    );
    // SAFETY: the ffi library is needed to load libshmprom; the scripts are ours.
    let lua = unsafe { Lua::unsafe_new_with(StdLib::ALL, LuaOptions::default()) };
    let setup = format!(
        "package.path = '{0}/lua/?.lua;{0}/tests/lua/?.lua;' .. package.path\n\
         package.cpath = '{0}/target/release/?.so;' .. package.cpath",
        root.display()
    );
    lua.load(&setup).exec().unwrap();
    let path = root.join("tests/lua").join(script);
    let code = std::fs::read_to_string(&path).unwrap();
    let res: mlua::Result<String> = lua
        .load(&code)
        .set_name(format!("@{}", path.display()))
        .eval();
    match res {
        Ok(summary) => println!("{script}: {summary}"),
        Err(e) => panic!("{script} failed:\n{e}"),
    }
}

#[test]
fn api() {
    run("api_test.lua");
}

#[test]
fn errors() {
    run("errors_test.lua");
}
