# shmprom: one command per task.
SHELL := /bin/bash
LIB := target/release/libshmprom.so
MODULE := target/release/ngx_http_shmprom_module.so

.PHONY: all run test build deps deps-run valgrind fuzz test-rust test-loom test-nginx bench fmt lint cdefs clean

all: build

deps:
	@scripts/install-deps.sh test

deps-run:
	@scripts/install-deps.sh run

build: $(LIB) $(MODULE)

$(LIB): Cargo.toml $(wildcard src/*.rs src/*/*.rs)
	cargo build --release

# the nginx module (gateway preset in C), against the Debian nginx-dev
# sources of the installed nginx
$(MODULE): nginx-module/config nginx-module/ngx_http_shmprom_module.c include/shmprom.h
	scripts/build-module.sh

# Builds, then runs the file-system gateway on its embedded default
# (gateway 127.0.0.1:8080, metrics 127.0.0.1:9145, storage nodes 8081-8083).
run: deps-run build
	scripts/run-gateway.sh

# Builds, then passes every test: Rust unit/integration/model tests, the
# in-process Lua tests, and the nginx tests in t/.
test: deps build test-rust test-loom test-nginx

test-rust: build
	cargo test --release

test-loom:
	RUSTFLAGS="--cfg loom" cargo test --release --lib --target-dir target/loom loom_tests

test-nginx: build
	prove -r t/

bench: deps build
	bench/run-all.sh

# nginx and the in-process Lua tests under valgrind memcheck (slow)
valgrind: build
	scripts/valgrind-check.sh

# coverage-guided fuzzing (needs cargo-fuzz and a nightly toolchain); the
# stable replay of the corpus runs in `make test-rust`
fuzz:
	cd fuzz && cargo +nightly fuzz run series_table -- -max_total_time=60
	cd fuzz && cargo +nightly fuzz run render -- -max_total_time=60

fmt:
	cargo fmt

lint:
	cargo fmt --check
	cargo clippy --all-targets --release -- -D warnings

cdefs:
	python3 scripts/gen_cdefs.py

clean:
	cargo clean

# the Rust tests (unit, integration, multi-process, fuzz corpus replay,
# in-process Lua) under AddressSanitizer: needs a nightly toolchain; not
# part of `make test`
.PHONY: asan
asan:
	RUSTFLAGS=-Zsanitizer=address cargo +nightly test --target x86_64-unknown-linux-gnu --target-dir target/asan

# the pure-Rust unit tests (series table on heap memory, key encoding, plane
# protocol, number formatting) under Miri: needs the nightly toolchain with
# the miri and rust-src components; not part of `make test` (minutes)
.PHONY: miri
miri:
	cargo +nightly miri test --lib --target-dir target/miri -- series::tests registry::tests planes::tests expose::fmt::tests
