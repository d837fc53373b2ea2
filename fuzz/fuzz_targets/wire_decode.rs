//! Feeds arbitrary bytes to the wire decoder the node runs on every
//! connection: framing, request bodies and reply bodies. It must never
//! panic; a request that decodes must re-encode to the same bytes, a reply
//! to the same length.
//!
//! The first byte picks the mode: odd = a valid header is built around the
//! rest (byte 1 is the opcode, the remainder the body), so the fuzzer
//! spends its time in the body decoders; even = the rest is a raw byte
//! stream, as a socket delivers it.
#![no_main]

use gyre::wire::{check_decoder, Request, ANY_SHARD, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data {
        [mode, opcode, body @ ..] if mode & 1 == 1 => {
            let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
            Request::Ping.encode(&mut frame, 1, ANY_SHARD, 0);
            frame[3] = *opcode;
            frame[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
            frame.extend_from_slice(body);
            check_decoder(&frame);
        }
        [_, rest @ ..] => check_decoder(rest),
        [] => {}
    }
});
