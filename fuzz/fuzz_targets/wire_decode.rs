//! Feeds arbitrary bytes to the wire decoder the node runs on every
//! connection: framing, request bodies and reply bodies. It must never
//! panic, and whatever decodes must re-encode to the same bytes.
//!
//! The first byte picks the mode: odd = a valid header is built around the
//! rest (byte 1 is the opcode, the remainder the body), so the fuzzer
//! spends its time in the body decoders; even = the rest is a raw byte
//! stream, as a socket delivers it.
#![no_main]

use gyre::wire::{split_frame, Request, Response, ANY_SHARD, HEADER_LEN, MAX_BODY_LEN};
use libfuzzer_sys::fuzz_target;

fn check_stream(data: &[u8]) {
    let mut at = 0;
    while let Ok(Some((header, total))) = split_frame(&data[at..], MAX_BODY_LEN) {
        let body = &data[at + HEADER_LEN..at + total];
        if let Ok(req) = Request::decode(header.opcode, body) {
            let mut out = Vec::new();
            req.encode(&mut out, header.request_id, header.shard, header.deadline_us);
            assert_eq!(&out[..], &data[at..at + total], "request re-encodes to its bytes");
        }
        if let Ok(resp) = Response::decode(header.opcode, body) {
            let mut out = Vec::new();
            resp.encode(&mut out, header.request_id, header.shard);
            assert_eq!(out.len(), total, "reply re-encodes to its length");
        }
        at += total;
    }
}

fuzz_target!(|data: &[u8]| {
    match data {
        [mode, opcode, body @ ..] if mode & 1 == 1 => {
            let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
            Request::Ping.encode(&mut frame, 1, ANY_SHARD, 0);
            frame[3] = *opcode;
            frame[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
            frame.extend_from_slice(body);
            check_stream(&frame);
        }
        [_, rest @ ..] => check_stream(rest),
        [] => {}
    }
});
