//! Feeds arbitrary bytes to the context decoder a node runs on every
//! write's context, and to the cluster secret's check after it: neither
//! may panic, and a context that decodes must re-encode to its bytes
//! (`check_context_decoder`). The first byte, when under 5, replaces the
//! input's own as its format byte, so the fuzzer spends its time in the
//! formats a node reads (0 is a format 1 clock that fails its own check).
#![no_main]

use gyre::auth::ClusterKeys;
use gyre::core::version::{check_context_decoder, decode_context};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    if let [choice, rest @ ..] = data {
        if *choice < 5 && !rest.is_empty() {
            bytes = rest.to_vec();
            bytes[0] = *choice;
        }
    }
    check_context_decoder(&bytes);
    if let Ok(ctx) = decode_context(&bytes) {
        let _ = ctx.check_key(b"key");
        let _ = ClusterKeys::from_secret(b"the fuzz target's secret").check(b"key", &bytes, &ctx);
    }
});
