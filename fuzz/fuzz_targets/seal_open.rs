//! Feeds arbitrary bytes to a sealed member connection's opener
//! (`gyre::auth::Opener::open`, `gyre::wire::open_frame`): none may panic,
//! and nothing opens but a frame sealed for that session, unchanged. The
//! input is opened as it is, and also used as a value: a PUT of it is
//! sealed, then changed at the input's first byte's place (skipped when
//! the change would be none) and cut at its second's, and neither the
//! changed nor the cut frame may open.
#![no_main]

use gyre::auth::{ClusterKeys, Exchange, Opener};
use gyre::wire::{Request, ANY_SHARD};
use libfuzzer_sys::fuzz_target;

fn opener(keys: &ClusterKeys, ex: &Exchange<'_>) -> Opener {
    keys.session(ex).responder().1
}

fuzz_target!(|data: &[u8]| {
    let keys = ClusterKeys::from_secret(b"the fuzz target's secret");
    let ex = Exchange { challenge: &[3; 16], nonce: &[4; 16], dialer: b"n1", responder: b"n2" };
    let mut arbitrary = data.to_vec();
    assert!(opener(&keys, &ex).open(&mut arbitrary).is_err(), "arbitrary bytes opened");
    let mut sealed = Vec::new();
    Request::Put { key: b"key", context: b"", value: data }.encode(&mut sealed, 7, ANY_SHARD, 0);
    let plain = sealed.clone();
    keys.session(&ex).dialer().0.seal(&mut sealed, 0);
    let mut whole = sealed.clone();
    let len = opener(&keys, &ex).open(&mut whole).expect("the sealed frame opens");
    assert_eq!(whole[..len], plain[..]);
    if let [at, cut, flip, ..] = data {
        let mut changed = sealed.clone();
        let at = *at as usize % changed.len();
        if *flip != 0 {
            changed[at] ^= flip;
            assert!(opener(&keys, &ex).open(&mut changed).is_err(), "a changed frame opened");
        }
        let mut short = sealed[..*cut as usize % sealed.len()].to_vec();
        assert!(opener(&keys, &ex).open(&mut short).is_err(), "a cut frame opened");
    }
});
