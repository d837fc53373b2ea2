//! The wire decoder on arbitrary and mutated input (the same checks as the
//! `fuzz/` targets, run in CI with proptest): it never panics; a request
//! that decodes re-encodes to the same bytes, a reply to the same length.
//! And the context decoder a write's context goes through, with the
//! cluster secret's check after it; and a sealed connection's opener on
//! arbitrary and mutated frames (it never panics, and opens nothing but
//! the frames sealed for it, unchanged).

use gyre::auth::{check_write_context, ClusterKeys, Exchange};
use gyre::core::version::{decode_context, encode_context, Clock};
use gyre::wire::{check_decoder, op, Request, Response, ANY_SHARD, REPLY_BIT};

const KNOWN_OPCODES: [u8; 11] = [
    op::PING,
    op::STATS,
    op::GET,
    op::PUT,
    op::DELETE,
    op::REPLICA_GET,
    op::REPLICA_PUT,
    op::HELLO,
    op::AUTH,
    op::RING,
    op::ERROR,
];
use proptest::prelude::*;

/// A context of every format: 1 (a bare clock), 2 (hinted), 3 (bound)
/// and 4 (signed).
fn valid_contexts() -> Vec<Vec<u8>> {
    let clock = Clock::decode(&[0x01, 0x02, 1, 0, 0, 0, 0, 0, 0, 0, 5, 9, 0, 0, 0, 0, 0, 0, 0, 0xac, 0x02]).unwrap();
    let bound = encode_context(&clock, b"key", Some(2));
    let mut signed = bound.clone();
    ClusterKeys::from_secret(b"the fuzz tests' secret").sign(&mut signed, b"key");
    let hinted = [&[0x02, 0x02, 0x00][..], &clock.to_bytes()[1..]].concat();
    vec![clock.to_bytes(), hinted, bound, signed]
}

/// The secret the signed context of [`valid_contexts`] was signed with,
/// and that context.
fn keys_and_signed() -> &'static (ClusterKeys, Vec<u8>) {
    static ONCE: std::sync::OnceLock<(ClusterKeys, Vec<u8>)> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| (ClusterKeys::from_secret(b"the fuzz tests' secret"), valid_contexts().swap_remove(3)))
}

/// [`check_write_context`] with the tests' secret and signed context.
fn check_context(bytes: &[u8]) {
    let (keys, signed) = keys_and_signed();
    check_write_context(keys, b"key", signed, bytes);
}

fn valid_frames() -> Vec<u8> {
    let mut out = Vec::new();
    Request::Get { key: b"key" }.encode(&mut out, 1, ANY_SHARD, 0);
    Request::Put { key: b"key", context: &[1, 1, 7, 0, 0, 0, 0, 0, 0, 0, 1], value: b"value" }
        .encode(&mut out, 2, 0, 9);
    Request::Delete { key: b"k", context: b"" }.encode(&mut out, 3, 1, 0);
    Response::Get { context: b"c", values: vec![b"a", b"bb"] }.encode(&mut out, 4, 0);
    Response::Error { code: gyre::wire::ErrorCode::Malformed, message: "m" }.encode(&mut out, 5, 0);
    out
}

proptest! {
    // A fixed seed: the same cases on every run (PROPTEST_RNG_SEED does not
    // override a seed set here; change it here to explore others).
    #![proptest_config(ProptestConfig { cases: 2000, rng_seed: proptest::test_runner::RngSeed::Fixed(0x6779_7265), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_decoder(&data);
    }

    // Arbitrary bytes almost never start with the magic, so the property
    // above mostly exercises header rejection. Here every frame has the
    // magic, the version and a body length that matches its body; the rest
    // of the header (opcode, flags, request id, shard, deadline) and the
    // body are arbitrary, several frames to a buffer.
    #[test]
    fn arbitrary_frames_with_valid_framing(frames in proptest::collection::vec(
        (proptest::array::uniform20(any::<u8>()), proptest::collection::vec(any::<u8>(), 0..128)), 1..6)) {
        let mut data = Vec::new();
        for (header, body) in &frames {
            let at = data.len();
            Request::Ping.encode(&mut data, 0, ANY_SHARD, 0);
            data[at + 3..at + 16].copy_from_slice(&header[..13]);
            // Half the frames carry a known opcode (request or reply), so
            // the body decoders see arbitrary bodies and flags.
            if header[13] & 1 == 0 {
                let known = KNOWN_OPCODES[usize::from(header[14]) % KNOWN_OPCODES.len()];
                data[at + 3] = known | (header[15] & REPLY_BIT);
            }
            // And half carry only flags some frame may have (any other
            // bit is refused with the header).
            if header[13] & 2 == 0 {
                data[at + 4..at + 6].copy_from_slice(&u16::from(header[1] & 1).to_le_bytes());
            }
            data[at + 20..at + 24].copy_from_slice(&header[16..20]);
            data[at + 16..at + 20].copy_from_slice(&(body.len() as u32).to_le_bytes());
            data.extend_from_slice(body);
        }
        check_decoder(&data);
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header(opcode in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut data = Vec::new();
        Request::Ping.encode(&mut data, 1, ANY_SHARD, 0);
        data[3] = opcode;
        data[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
        data.extend_from_slice(&body);
        check_decoder(&data);
    }

    #[test]
    fn arbitrary_contexts(data in proptest::collection::vec(any::<u8>(), 0..256), format in 1u8..9) {
        // Half of them start with a format byte a node reads (1 to 4).
        let mut data = data;
        if let Some(first) = data.first_mut().filter(|_| format <= 4) {
            *first = format;
        }
        check_context(&data);
    }

    #[test]
    fn mutated_valid_contexts(which in 0usize..4, flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4), cut in any::<prop::sample::Index>()) {
        let mut data = valid_contexts()[which].clone();
        for (i, b) in flips {
            let at = i.index(data.len());
            data[at] = b;
        }
        let keep = cut.index(data.len() + 1).max(data.len() / 2);
        data.truncate(keep);
        check_context(&data);
    }

    #[test]
    fn arbitrary_and_mutated_sealed_frames_do_not_open(
        data in proptest::collection::vec(any::<u8>(), 0..256),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let keys = ClusterKeys::from_secret(b"the fuzz tests' secret");
        let ex = Exchange { challenge: &[3; 16], nonce: &[4; 16], dialer: b"n1", responder: b"n2" };
        let opener = || keys.session(&ex).responder().1;
        let mut arbitrary = data.clone();
        prop_assert!(opener().open(&mut arbitrary).is_err(), "arbitrary bytes opened: {data:02x?}");
        // A frame sealed for this session, then changed or cut.
        let mut sealed = Vec::new();
        Request::Put { key: b"key", context: b"", value: &data }.encode(&mut sealed, 7, ANY_SHARD, 0);
        let plain = sealed.clone();
        keys.session(&ex).dialer().0.seal(&mut sealed, 0);
        let mut whole = sealed.clone();
        prop_assert_eq!(opener().open(&mut whole).map(|len| whole[..len].to_vec()), Ok(plain));
        let mut changed = sealed.clone();
        for (i, b) in flips {
            let at = i.index(changed.len());
            changed[at] ^= b | 1;
        }
        // (Two flips of one byte may cancel out.)
        prop_assert!(changed == sealed || opener().open(&mut changed).is_err());
        let mut short = sealed[..cut.index(sealed.len())].to_vec();
        prop_assert!(opener().open(&mut short).is_err());
    }

    #[test]
    fn mutated_valid_frames(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut data = valid_frames();
        for (i, b) in flips {
            let at = i.index(data.len());
            data[at] = b;
        }
        check_decoder(&data);
    }
}

/// The valid contexts the mutations start from decode, re-encode to their
/// bytes, and the signed one passes the secret's check.
#[test]
fn every_context_format_decodes_and_encodes_back() {
    for (format, ctx) in valid_contexts().iter().enumerate() {
        assert_eq!(ctx[0], format as u8 + 1);
        assert!(decode_context(ctx).is_ok(), "format {}", format + 1);
        check_context(ctx);
    }
}
