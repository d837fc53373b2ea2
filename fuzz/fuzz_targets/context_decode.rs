//! Feeds arbitrary bytes to the checks a node runs on every write's
//! context (`gyre::auth::check_write_context`: decoding and re-encoding,
//! the key binding, the cluster secret's MAC check): none may panic, and
//! with the secret only the context it signed is taken. The first byte,
//! when under 5, replaces the input's own as its format byte, so the
//! fuzzer spends its time in the formats a node reads (0 is a format 1
//! clock that fails its own check).
#![no_main]

use std::sync::OnceLock;

use gyre::auth::{check_write_context, ClusterKeys};
use gyre::core::version::{encode_context, Clock};
use libfuzzer_sys::fuzz_target;

/// The target's secret, and the one context of key `key` it signed.
fn keys_and_signed() -> &'static (ClusterKeys, Vec<u8>) {
    static ONCE: OnceLock<(ClusterKeys, Vec<u8>)> = OnceLock::new();
    ONCE.get_or_init(|| {
        let keys = ClusterKeys::from_secret(b"the fuzz target's secret");
        let clock = Clock::decode(&[0x01, 0x01, 7, 0, 0, 0, 0, 0, 0, 0, 3]).expect("a clock");
        let mut signed = encode_context(&clock, b"key", Some(1));
        keys.sign(&mut signed, b"key");
        (keys, signed)
    })
}

fuzz_target!(|data: &[u8]| {
    let (keys, signed) = keys_and_signed();
    match data {
        [choice, rest @ ..] if *choice < 5 && !rest.is_empty() => {
            let mut bytes = rest.to_vec();
            bytes[0] = *choice;
            check_write_context(keys, b"key", signed, &bytes);
        }
        _ => check_write_context(keys, b"key", signed, data),
    }
});
