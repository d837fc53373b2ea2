//! Feeds arbitrary bytes to the wire decoder the node runs on every
//! connection: framing, request bodies and reply bodies. It must never
//! panic, never allocate past the limits, and whatever decodes must
//! re-encode to the same bytes.
#![no_main]

use gyre::wire::{split_frame, Request, Response, HEADER_LEN, MAX_BODY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
