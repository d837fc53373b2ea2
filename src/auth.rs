//! The cluster secret: the keys a node derives from it, the MAC that signs
//! the contexts it hands out, the proof a member gives at connect, and the
//! seal on every frame of a member connection after that.
//!
//! Owns: the derivation of both keys from the secret file's bytes, the
//! context MAC (format 4, `crate::core::version`), the challenge and
//! proof of the HELLO/AUTH exchange, and each proven connection's session
//! key, with which [`Sealer`] and [`Opener`] encrypt and authenticate its
//! frames (AES-256-GCM; the frame layout is `crate::wire::seal_frame`'s;
//! ARCHITECTURE.md, "Cluster secret").
//!
//! Invariant: nothing outside this module sees the secret or a key derived
//! from it; every check compares MACs in constant time (`blake3::Hash`'s
//! equality), and each key serves one purpose (a context's MAC can never
//! pass for a member's proof, or the other way round; a session key seals
//! one connection's frames and nothing else); a sealed frame opens once,
//! in its place in its direction's sequence.
//!
//! Why blake3: a keyed hash that is a MAC as it stands (no HMAC
//! construction), fast on the few dozen bytes a context has (one
//! compression), and its `derive_key` mode gives the two keys apart. A
//! seeded xxh3, which the key tag uses, is no MAC: its seed can be
//! recovered from outputs. Why AES-256-GCM for the frames: an AEAD, so
//! members' keys and values are encrypted as well as authenticated, and
//! with AES-NI and carry-less multiplication cheaper on a replica write
//! of a few hundred bytes than a keyed blake3 tag of it alone, which a
//! first version used (perf/RESULTS.md, "Cluster: sealed member
//! connections": 238 against 286 ns to seal 172 bytes).

use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes256Gcm;
use anyhow::{bail, Context};

use crate::core::version::{
    check_context_decoder, sign_context, signed_part, DecodedContext, VersionError, CONTEXT_MAC_LEN,
};
use crate::wire::{CHALLENGE_LEN, PROOF_LEN};

/// The fewest bytes a secret file may hold (after trailing whitespace):
/// 128 bits if they are random. `head -c 32 /dev/urandom | base64 > FILE`
/// makes a good one.
pub const MIN_SECRET_LEN: usize = 16;

/// The most bytes read from a secret file: a secret is a line, not data;
/// a bigger file is most likely the wrong one.
pub const MAX_SECRET_LEN: usize = 4096;

/// `blake3::derive_key` contexts: one per key, fixed forever (changing
/// one changes every MAC, so every member must agree on it).
const SECRET_CONTEXT: &str = "gyre 2026-12-07 cluster secret";
const CONTEXT_KEY_CONTEXT: &str = "gyre 2026-12-07 context MAC";
const PEER_KEY_CONTEXT: &str = "gyre 2026-12-07 member proof";

/// The keys a node derives from its cluster secret, and from the secrets
/// it also accepts while the cluster moves to a new one.
#[derive(Clone)]
pub struct ClusterKeys {
    /// The keys of each secret: the first signs contexts and proves this
    /// node to others; every one of them is accepted in a context or a
    /// proof (rotation: ARCHITECTURE.md, "Cluster secret").
    sets: Vec<Keys>,
    /// Whether what proves nothing is taken as well: an unsigned context,
    /// a replica message on a connection without a proof, a member that
    /// sends no challenge. Only while a cluster turns its secret on or
    /// off, member by member (a signed context with a clock and a wrong
    /// MAC, and a wrong proof, are still refused).
    accept_unauthenticated: bool,
}

/// The keys of one secret.
#[derive(Clone)]
struct Keys {
    /// Signs and checks contexts.
    context: [u8; 32],
    /// Makes and checks members' proofs at connect.
    peer: [u8; 32],
}

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKeys(..)")
    }
}

impl Keys {
    /// The MAC of the context bytes `covered` handed out for `key`.
    fn context_mac(&self, key: &[u8], covered: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.context);
        // The key's length first, so that no (key, context) pair hashes
        // like another with the boundary moved.
        h.update(&(key.len() as u32).to_le_bytes());
        h.update(key);
        h.update(covered);
        h.finalize()
    }

    /// Whether `mac` is the MAC of `covered` for `key` (constant time:
    /// compared as hashes, the stored half padded with the computed hash's
    /// other half).
    fn context_mac_matches(&self, key: &[u8], covered: &[u8], mac: &[u8; CONTEXT_MAC_LEN]) -> bool {
        let want = self.context_mac(key, covered);
        let mut full = *want.as_bytes();
        full[..CONTEXT_MAC_LEN].copy_from_slice(mac);
        blake3::Hash::from(full) == want
    }

    /// The proof that `side` of a connection holds the secret: the member
    /// `dialer` that opened it, to the member `responder` it meant to
    /// reach, or the other way round, for the responder's `challenge` (its
    /// HELLO reply) and the dialer's `nonce` (its AUTH). Binding both
    /// names, both nonces and the side means a proof answers only the one
    /// exchange it was made for: an impostor at a member's address cannot
    /// pass a challenge it got from another member on to a dialer and use
    /// the dialer's proof there (found by a review, when the proof named
    /// only the dialer), nor reflect a proof back, and a dialer learns that
    /// whoever answered holds the secret.
    fn proof(&self, side: Side, exchange: &Exchange<'_>) -> [u8; PROOF_LEN] {
        self.exchange_mac(
            match side {
                Side::Dialer => b"dialer",
                Side::Responder => b"answer",
            },
            exchange,
        )
    }

    /// The session key of a connection whose opening `exchange` proved the
    /// secret both ways: what seals its frames after the AUTH reply. Bound
    /// to the exchange as the proofs are (a fresh challenge and nonce give
    /// every connection its own), under a label no proof has.
    fn session(&self, exchange: &Exchange<'_>) -> Session {
        Session { key: self.exchange_mac(b"session", exchange) }
    }

    /// `blake3_keyed(peer key, label || challenge || nonce || u16 len,
    /// dialer || u16 len, responder)`: proofs and session keys. The labels
    /// ("dialer", "answer", "session") differ in their first six bytes,
    /// and what follows them has one layout, so no input of one label is
    /// another's.
    fn exchange_mac(&self, label: &[u8], exchange: &Exchange<'_>) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.peer);
        h.update(label);
        h.update(exchange.challenge);
        h.update(exchange.nonce);
        for name in [exchange.dialer, exchange.responder] {
            h.update(&(name.len() as u16).to_le_bytes());
            h.update(name);
        }
        *h.finalize().as_bytes()
    }
}

impl ClusterKeys {
    /// The keys of `secret` (the file's bytes, trailing whitespace cut).
    pub fn from_secret(secret: &[u8]) -> ClusterKeys {
        let root = blake3::derive_key(SECRET_CONTEXT, secret);
        let keys = Keys {
            context: blake3::derive_key(CONTEXT_KEY_CONTEXT, &root),
            peer: blake3::derive_key(PEER_KEY_CONTEXT, &root),
        };
        ClusterKeys { sets: vec![keys], accept_unauthenticated: false }
    }

    /// These keys, accepting `other`'s as well (signing and proving with
    /// these).
    pub fn accepting(mut self, other: ClusterKeys) -> ClusterKeys {
        self.sets.extend(other.sets);
        self
    }

    /// These keys, taking what proves nothing as well while `accept`
    /// ([`Self::accepts_unauthenticated`]).
    pub fn with_unauthenticated(mut self, accept: bool) -> ClusterKeys {
        self.accept_unauthenticated = accept;
        self
    }

    /// Whether an unsigned context, a replica message on a connection that
    /// proved nothing, and a member that sends no challenge are taken (a
    /// cluster turning its secret on or off, member by member).
    pub fn accepts_unauthenticated(&self) -> bool {
        self.accept_unauthenticated
    }

    /// The keys of the secret file `current` (it signs and proves), also
    /// accepting those of the files `accepted` (ARCHITECTURE.md, "Cluster
    /// secret": rotation).
    pub fn load_all(current: &Path, accepted: &[PathBuf]) -> anyhow::Result<ClusterKeys> {
        let mut keys = ClusterKeys::load(current)?;
        for path in accepted {
            keys = keys.accepting(ClusterKeys::load(path).context("an accepted secret (accept_cluster_secret_files)")?);
        }
        Ok(keys)
    }

    /// Reads a secret file: its bytes up to trailing whitespace (a newline
    /// an editor or `echo` left is not part of it), refused if fewer than
    /// [`MIN_SECRET_LEN`] or more than [`MAX_SECRET_LEN`].
    pub fn load(path: &Path) -> anyhow::Result<ClusterKeys> {
        let meta = std::fs::metadata(path).with_context(|| format!("reading cluster secret {}", path.display()))?;
        if meta.len() > MAX_SECRET_LEN as u64 {
            bail!(
                "cluster secret {} holds {} bytes, more than {MAX_SECRET_LEN}: is it the right file?",
                path.display(),
                meta.len()
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "the cluster secret can be read by others than its owner (chmod 600 it)");
            }
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading cluster secret {}", path.display()))?;
        let secret = bytes.trim_ascii_end();
        if secret.len() < MIN_SECRET_LEN {
            bail!(
                "cluster secret {} holds {} bytes, fewer than {MIN_SECRET_LEN} (make one with `head -c 32 /dev/urandom | base64 > FILE`)",
                path.display(),
                secret.len()
            );
        }
        Ok(ClusterKeys::from_secret(secret))
    }

    /// The keys this node signs and proves with.
    fn current(&self) -> &Keys {
        &self.sets[0]
    }

    /// Signs `context`, a bound context of `key` (format 3 made format 4),
    /// with the current secret.
    pub fn sign(&self, context: &mut Vec<u8>, key: &[u8]) {
        sign_context(context, |covered| {
            let mac = self.current().context_mac(key, covered);
            mac.as_bytes()[..CONTEXT_MAC_LEN].try_into().expect("a blake3 hash is 32 bytes")
        });
    }

    /// Checks that `ctx`, decoded from `bytes`, is a context this cluster
    /// signed for `key` (with any secret it accepts). A context with an
    /// empty clock needs no signature: it claims to have seen nothing,
    /// which any client may; an unsigned one is taken only while
    /// [`Self::accepts_unauthenticated`].
    pub fn check(&self, key: &[u8], bytes: &[u8], ctx: &DecodedContext) -> Result<(), VersionError> {
        if ctx.clock.is_empty() {
            return Ok(());
        }
        let Some(mac) = ctx.mac else {
            return if self.accept_unauthenticated { Ok(()) } else { Err(VersionError::Unsigned) };
        };
        // `bytes` are those `ctx` was decoded from; others fail the MAC.
        let covered = signed_part(bytes).unwrap_or_default();
        match self.sets.iter().any(|k| k.context_mac_matches(key, covered, &mac)) {
            true => Ok(()),
            false => Err(VersionError::BadSignature),
        }
    }

    /// The proof of `side` for `exchange` (see `Keys::proof`), with the
    /// current secret: what a dialer sends in its AUTH.
    pub fn proof(&self, side: Side, exchange: &Exchange<'_>) -> [u8; PROOF_LEN] {
        self.current().proof(side, exchange)
    }

    /// Whether `proof` is a responder's answer for `exchange` with the
    /// current secret: the one the dialer proved with, and so the one a
    /// responder that checked the proof answers with ([`Self::answer`]).
    /// Not with an accepted one: a member rotating away from a leaked
    /// secret would take an impostor holding only that (found by a
    /// review).
    pub fn check_answer(&self, exchange: &Exchange<'_>, proof: &[u8; PROOF_LEN]) -> bool {
        proofs_match(&self.current().proof(Side::Responder, exchange), proof)
    }

    /// How many secrets this node accepts (the current one included).
    pub fn secrets(&self) -> usize {
        self.sets.len()
    }

    /// A responder's answer to a dialer's `proof` for `exchange`: if the
    /// proof is good with any secret this node accepts, the responder's
    /// proof with that same secret (which the dialer holds, whichever of
    /// the two is current there), and the connection's session under it.
    pub fn answer(&self, exchange: &Exchange<'_>, proof: &[u8; PROOF_LEN]) -> Option<([u8; PROOF_LEN], Session)> {
        let k = self.sets.iter().find(|k| proofs_match(&k.proof(Side::Dialer, exchange), proof))?;
        Some((k.proof(Side::Responder, exchange), k.session(exchange)))
    }

    /// The session of a connection this node opened, once the answer to
    /// its AUTH checked out ([`Self::check_answer`]: under the current
    /// secret, as the answer was).
    pub fn session(&self, exchange: &Exchange<'_>) -> Session {
        self.current().session(exchange)
    }
}

/// The key that seals one member connection's frames, both ways, once its
/// opening exchange proved the secret both ways (ARCHITECTURE.md, "Cluster
/// secret": sealed frames). Split into the two ends' halves.
pub struct Session {
    key: [u8; 32],
}

impl Session {
    /// The dialer's halves: it seals what it sends, and opens what the
    /// responder sends.
    pub fn dialer(self) -> (Sealer, Opener) {
        self.split(Side::Dialer)
    }

    /// The responder's halves.
    pub fn responder(self) -> (Sealer, Opener) {
        self.split(Side::Responder)
    }

    /// `me`'s halves, under one AES-256-GCM key schedule (AES-NI and
    /// carry-less multiplication where the CPU has them, picked by
    /// `aes-gcm` at run time).
    fn split(self, me: Side) -> (Sealer, Opener) {
        let cipher = Aes256Gcm::new(&self.key.into());
        let other = match me {
            Side::Dialer => Side::Responder,
            Side::Responder => Side::Dialer,
        };
        (Sealer(Way { cipher: cipher.clone(), from: me, next: 0 }), Opener(Way { cipher, from: other, next: 0 }))
    }
}

/// One way of a session: the frames the side `from` sends.
struct Way {
    cipher: Aes256Gcm,
    /// The sender: part of every nonce, so that a frame sent one way never
    /// opens as one sent the other (reflected).
    from: Side,
    /// The sequence number of the next frame.
    next: u64,
}

impl Way {
    /// The AES-GCM nonce of the next frame: `u8 from (0 dialer, 1
    /// responder), [0; 3], u64 seq`. The sequence number is the count of
    /// frames before it that way, never sent: a frame dropped, replayed,
    /// reordered, reflected or moved to another connection (another session
    /// key) does not open. No nonce repeats under a key: each connection has
    /// its own key, each way its `from`, each frame its `seq`.
    fn nonce(&self) -> aes_gcm::Nonce<aes_gcm::aead::consts::U12> {
        let mut n = [0u8; 12];
        n[0] = self.from as u8;
        n[4..].copy_from_slice(&self.next.to_le_bytes());
        n.into()
    }
}

/// Seals the frames one end of a session sends, in the order they go on
/// the wire.
pub struct Sealer(Way);

impl Sealer {
    /// Seals the whole frame at `buf[at..]`, the next to go out
    /// ([`crate::wire::seal_frame`]): its body encrypted, its header (in
    /// the clear) and body authenticated by the tag.
    pub fn seal(&mut self, buf: &mut Vec<u8>, at: usize) {
        let (cipher, nonce) = (&self.0.cipher, self.0.nonce());
        crate::wire::seal_frame(buf, at, |header, body| {
            // Fails only past GCM's 64 GiB a message; a frame is at most
            // `MAX_BODY_LEN`.
            cipher.encrypt_in_place_detached(&nonce, header, body).expect("a frame is within GCM's limit").into()
        });
        self.0.next += 1;
    }
}

/// Opens the frames one end of a session receives, in the order they
/// arrive.
pub struct Opener(Way);

impl Opener {
    /// Checks the whole sealed frame `frame` (the next to arrive) and
    /// opens it in place ([`crate::wire::open_frame`]): its length without
    /// the tag. A frame that fails ends the connection: the sequence is
    /// lost. (The tag is checked in constant time, by `aes-gcm`.)
    pub fn open(&mut self, frame: &mut [u8]) -> Result<usize, crate::wire::SealError> {
        let (cipher, nonce) = (&self.0.cipher, self.0.nonce());
        let len = crate::wire::open_frame(frame, |header, body, tag| {
            cipher.decrypt_in_place_detached(&nonce, header, body, tag.into()).is_ok()
        })?;
        self.0.next += 1;
        Ok(len)
    }
}

/// Which end of a connection a proof comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The member that opened the connection (its AUTH).
    Dialer = 0,
    /// The member it reached (the AUTH reply).
    Responder = 1,
}

/// What a connection's opening exchange binds its proofs to.
pub struct Exchange<'a> {
    /// The responder's random challenge (its HELLO reply).
    pub challenge: &'a [u8; CHALLENGE_LEN],
    /// The dialer's random nonce (its AUTH).
    pub nonce: &'a [u8; CHALLENGE_LEN],
    /// The dialer's member name (its HELLO).
    pub dialer: &'a [u8],
    /// The name of the member the dialer meant to reach.
    pub responder: &'a [u8],
}

/// Whether two proofs are equal, in constant time (`blake3::Hash`'s
/// equality): a node keeps the proof it expects and compares.
fn proofs_match(expected: &[u8; PROOF_LEN], got: &[u8; PROOF_LEN]) -> bool {
    blake3::Hash::from(*expected) == blake3::Hash::from(*got)
}

/// The checks a node runs on a write's context `bytes` for `key`, on
/// arbitrary input (the fuzz target's and the tests' check): decoding and
/// re-encoding ([`check_context_decoder`]), the key binding, then `keys`'
/// MAC check. None may panic; and a context bound to `key` with a clock
/// is taken only if it is `signed`, the one context of `key` that `keys`
/// signed here (any other bytes, a changed clock or MAC, or an unsigned
/// format, are refused).
#[doc(hidden)]
pub fn check_write_context(keys: &ClusterKeys, key: &[u8], signed: &[u8], bytes: &[u8]) {
    check_context_decoder(bytes);
    let Ok(ctx) = crate::core::version::decode_context(bytes) else { return };
    if ctx.check_key(key).is_err() {
        return;
    }
    let checked = keys.check(key, bytes, &ctx);
    if bytes == signed || ctx.clock.is_empty() {
        assert_eq!(checked, Ok(()), "{bytes:02x?}");
    } else {
        assert!(checked.is_err(), "taken with the secret: {bytes:02x?}");
    }
}

/// Writes a new random cluster secret to `path` (32 random bytes as hex,
/// a line), readable by its owner only, unless a file is there: it is
/// kept (`gyre dev`'s cluster keeps its secret across restarts). The
/// secret is written and synced under another name and then linked into
/// place, so a crash never leaves an empty or partial secret there (found
/// by a review: it would be kept, and refused at every start).
#[cfg(unix)]
pub fn create_secret_file(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| anyhow::anyhow!("no random bytes for a cluster secret: {e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension(format!("new-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(format!("{hex}\n").as_bytes()).and_then(|()| f.sync_all()));
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    });
    let _ = std::fs::remove_file(&tmp);
    linked.with_context(|| format!("writing {}", path.display()))
}

/// A fresh random challenge.
pub fn challenge() -> std::io::Result<[u8; CHALLENGE_LEN]> {
    let mut c = [0u8; CHALLENGE_LEN];
    getrandom::getrandom(&mut c).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::version::{decode_context, encode_context_into, Clock};

    fn keys(secret: &[u8]) -> ClusterKeys {
        ClusterKeys::from_secret(secret)
    }

    fn signed(k: &ClusterKeys, key: &[u8], clock: &Clock) -> Vec<u8> {
        let mut out = Vec::new();
        encode_context_into(&mut out, clock, key, None);
        k.sign(&mut out, key);
        out
    }

    /// As a store checks a write's context: its key, then its MAC.
    fn check(k: &ClusterKeys, key: &[u8], bytes: &[u8]) -> Result<(), VersionError> {
        let ctx = decode_context(bytes)?;
        ctx.check_key(key)?;
        k.check(key, bytes, &ctx)
    }

    /// `{7: 3}`.
    fn clock() -> Clock {
        Clock::decode(&[0x01, 0x01, 7, 0, 0, 0, 0, 0, 0, 0, 3]).unwrap()
    }

    /// Pins the derivation (all three values checked against Python's
    /// blake3 package): a change to it (or to blake3) would refuse
    /// every context clients hold and every member of a mixed cluster.
    #[test]
    fn golden_mac() {
        let k = keys(b"0123456789abcdef");
        let ctx = signed(&k, b"k", &clock());
        let mac = &ctx[ctx.len() - CONTEXT_MAC_LEN..];
        assert_eq!(hex(mac), "97072f4f6ba87aca10f0971f9670c1b1");
        let ex =
            Exchange { challenge: &[1; CHALLENGE_LEN], nonce: &[2; CHALLENGE_LEN], dialer: b"n1", responder: b"n2" };
        assert_eq!(
            hex(&k.proof(Side::Dialer, &ex)),
            "b2edcafa04b680fe1fea787dd29c3fee4ca61cae5fd00f5ed59047ac32f7d51b"
        );
        assert_eq!(
            hex(&k.proof(Side::Responder, &ex)),
            "26d3bf02b62d28bbe732daf8c036f4b59a27d7cff5b5bdcc96cc27b881f9e1f7"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn ping(id: u64) -> Vec<u8> {
        let mut f = Vec::new();
        crate::wire::Request::Ping.encode(&mut f, id, crate::wire::ANY_SHARD, 0);
        f
    }

    /// Pins the session key and the seal (all three values checked
    /// against Python's blake3 and `cryptography`'s AESGCM): a change to
    /// either would make members of two builds refuse each other's every
    /// frame.
    #[test]
    fn golden_seal() {
        let k = keys(b"0123456789abcdef");
        let ex =
            Exchange { challenge: &[1; CHALLENGE_LEN], nonce: &[2; CHALLENGE_LEN], dialer: b"n1", responder: b"n2" };
        assert_eq!(hex(&k.session(&ex).key), "e4424a226033990963eaf094bc48519192be72e96dacd53318dffac0ad276bb1");
        let (mut sealer, _) = k.session(&ex).dialer();
        let mut first = ping(1);
        sealer.seal(&mut first, 0);
        // The header with SEALED (0x8000) and body_len 16, then the tag
        // (an empty body).
        assert_eq!(hex(&first), "475901010080ffff01000000000000001000000000000000b64e9f04b83d856cf0cf7b1187666d84");
        // The second: a GET of "k", its body (`01 00 6b`) encrypted.
        let mut second = Vec::new();
        crate::wire::Request::Get { key: b"k" }.encode(&mut second, 2, crate::wire::ANY_SHARD, 0);
        sealer.seal(&mut second, 0);
        assert_eq!(
            hex(&second),
            "475901100080ffff020000000000000013000000000000000b8f8efc813c91e1a410289f5c3347fea92e76"
        );
    }

    /// A sealed frame opens once, in its place in the sequence, going its
    /// own way, on its own connection, unchanged: what an attacker on the
    /// network path could otherwise do to a member connection (inject,
    /// replay, reorder, reflect, splice from another connection, change).
    #[test]
    fn a_sealed_frame_opens_once_in_order_one_way_on_its_own_connection() {
        use crate::wire::SealError;
        let k = keys(b"a cluster secret of some length");
        let (c, n) = ([9; CHALLENGE_LEN], [8; CHALLENGE_LEN]);
        let ex = Exchange { challenge: &c, nonce: &n, dialer: b"n1", responder: b"n2" };
        let (mut dialer_seals, mut dialer_opens) = k.session(&ex).dialer();
        let sealed: Vec<Vec<u8>> = (1..=3)
            .map(|id| {
                let mut f = ping(id);
                dialer_seals.seal(&mut f, 0);
                f
            })
            .collect();
        let open = |opener: &mut Opener, f: &[u8]| {
            let mut f = f.to_vec();
            opener.open(&mut f).map(|len| f[..len].to_vec())
        };
        // Out of order: the second first.
        assert_eq!(open(&mut k.session(&ex).responder().1, &sealed[1]), Err(SealError::BadTag));
        // Reflected back to the dialer.
        assert_eq!(open(&mut dialer_opens, &sealed[0]), Err(SealError::BadTag));
        // Another connection's session (another nonce), another secret.
        let other = Exchange { nonce: &c, ..ex };
        assert_eq!(open(&mut k.session(&other).responder().1, &sealed[0]), Err(SealError::BadTag));
        let stranger = keys(b"another cluster's secret");
        assert_eq!(open(&mut stranger.session(&ex).responder().1, &sealed[0]), Err(SealError::BadTag));
        // Any byte changed.
        for i in 0..sealed[0].len() {
            let mut bad = sealed[0].clone();
            bad[i] ^= 0x01;
            assert!(open(&mut k.session(&ex).responder().1, &bad).is_err(), "byte {i} flipped");
        }
        // Unsealed, or cut.
        assert_eq!(open(&mut k.session(&ex).responder().1, &ping(1)), Err(SealError::NotSealed));
        let cut = &sealed[0][..sealed[0].len() - 1];
        assert_eq!(open(&mut k.session(&ex).responder().1, cut), Err(SealError::TooShort));
        // In order, each opens to the frame as it was encoded; a failure
        // moved nothing on.
        let (mut responder_seals, mut responder_opens) = k.session(&ex).responder();
        assert_eq!(open(&mut responder_opens, &sealed[1]), Err(SealError::BadTag), "out of order");
        assert!(open(&mut responder_opens, &ping(1)).is_err());
        for (i, f) in sealed.iter().enumerate() {
            assert_eq!(open(&mut responder_opens, f), Ok(ping(i as u64 + 1)), "frame {i}");
        }
        // Once each: a replay fails.
        assert_eq!(open(&mut responder_opens, &sealed[2]), Err(SealError::BadTag));
        // And the other way.
        let mut reply = ping(7);
        responder_seals.seal(&mut reply, 0);
        assert_eq!(open(&mut dialer_opens, &reply), Ok(ping(7)));
    }

    #[test]
    fn a_signed_context_passes_for_its_key_only() {
        let k = keys(b"a cluster secret of some length");
        let ctx = signed(&k, b"k", &clock());
        assert_eq!(check(&k, b"k", &ctx), Ok(()));
        assert_eq!(check(&k, b"j", &ctx), Err(VersionError::OtherKey));
        // Another key whose tag matched would still fail the MAC: the MAC
        // covers the key itself.
        assert_eq!(k.check(b"j", &ctx, &decode_context(&ctx).unwrap()), Err(VersionError::BadSignature));
        // Another cluster's secret.
        assert_eq!(check(&keys(b"another cluster's secret"), b"k", &ctx), Err(VersionError::BadSignature));
    }

    #[test]
    fn a_changed_byte_fails() {
        let k = keys(b"a cluster secret of some length");
        let ctx = signed(&k, b"k", &clock());
        // The format byte too: 4 ^ 1 is no format a node reads.
        for i in 0..ctx.len() {
            let mut bad = ctx.clone();
            bad[i] ^= 0x01;
            assert_ne!(check(&k, b"k", &bad), Ok(()), "byte {i} flipped");
        }
    }

    #[test]
    fn unsigned_contexts_with_a_clock_are_refused() {
        let k = keys(b"a cluster secret of some length");
        let mut bound = Vec::new();
        encode_context_into(&mut bound, &clock(), b"k", None);
        assert_eq!(check(&k, b"k", &bound), Err(VersionError::Unsigned));
        assert_eq!(check(&k, b"k", &clock().to_bytes()), Err(VersionError::Unsigned), "format 1");
        // Nothing seen: nothing to forge.
        let mut empty = Vec::new();
        encode_context_into(&mut empty, &Clock::new(), b"k", None);
        assert_eq!(check(&k, b"k", &empty), Ok(()));
        assert_eq!(check(&k, b"k", &[]), Ok(()));
    }

    #[test]
    fn proofs() {
        let k = keys(b"a cluster secret of some length");
        let (c, n) = ([9; CHALLENGE_LEN], [8; CHALLENGE_LEN]);
        let ex = Exchange { challenge: &c, nonce: &n, dialer: b"n1", responder: b"n2" };
        let p = k.proof(Side::Dialer, &ex);
        let answer = k.answer(&ex, &p).expect("taken").0;
        assert!(k.check_answer(&ex, &answer));
        assert!(!k.check_answer(&ex, &p), "a dialer's proof is no answer (reflected)");
        assert!(k.answer(&ex, &answer).is_none(), "an answer is no dialer's proof");
        let other = |ex: Exchange<'_>| k.answer(&ex, &p).is_some();
        assert!(!other(Exchange { dialer: b"n3", ..ex }), "another dialer");
        assert!(!other(Exchange { responder: b"n3", ..ex }), "made for another member (relayed)");
        assert!(!other(Exchange { challenge: &n, ..ex }), "another challenge");
        assert!(!other(Exchange { nonce: &c, ..ex }), "another nonce");
        // The names are length-prefixed: no boundary can move.
        assert!(!other(Exchange { dialer: b"n1n", responder: b"2", ..ex }));
        assert!(keys(b"another cluster's secret").answer(&ex, &p).is_none());
        // The two keys differ: a context MAC is no proof.
        assert_ne!(k.current().context, k.current().peer);
        assert_ne!(challenge().unwrap(), challenge().unwrap());
    }

    /// A cluster moves from secret OLD to NEW member by member: first every
    /// member accepts NEW (signing with OLD), then every member signs with
    /// NEW (accepting OLD), then drops OLD. At each step any two members,
    /// each in either of the two states the step spans, take each other's
    /// contexts and proofs, and a member's answer to a proof is one the
    /// dialer can check.
    #[test]
    fn a_secret_is_rotated_member_by_member() {
        let (old, new) = (b"the old cluster secret", b"the new cluster secret");
        let only_old = || keys(old);
        let old_accepting_new = || keys(old).accepting(keys(new));
        let new_accepting_old = || keys(new).accepting(keys(old));
        let only_new = || keys(new);
        let steps = [
            (only_old(), old_accepting_new()),
            (old_accepting_new(), new_accepting_old()),
            (new_accepting_old(), only_new()),
        ];
        let (c, n) = ([1; CHALLENGE_LEN], [2; CHALLENGE_LEN]);
        let ex = Exchange { challenge: &c, nonce: &n, dialer: b"n1", responder: b"n2" };
        for (i, (a, b)) in steps.iter().enumerate() {
            for (x, y) in [(a, b), (b, a)] {
                assert_eq!(check(y, b"k", &signed(x, b"k", &clock())), Ok(()), "step {i}: a context");
                let answer = y.answer(&ex, &x.proof(Side::Dialer, &ex));
                let (answer, session) = answer.unwrap_or_else(|| panic!("step {i}: the dialer's proof is refused"));
                assert!(x.check_answer(&ex, &answer), "step {i}: the answer is refused");
                // Both ends seal under the same session key.
                let mut f = ping(1);
                x.session(&ex).dialer().0.seal(&mut f, 0);
                assert!(session.responder().1.open(&mut f).is_ok(), "step {i}: the sessions differ");
            }
        }
        // Across two steps, they do not: OLD alone and NEW alone.
        assert_eq!(check(&only_new(), b"k", &signed(&only_old(), b"k", &clock())), Err(VersionError::BadSignature));
        assert!(only_new().answer(&ex, &only_old().proof(Side::Dialer, &ex)).is_none());
        // A dialer that signs with NEW and still accepts OLD takes no
        // answer made with OLD: an impostor holding only the old (leaked)
        // secret cannot answer it.
        assert!(!new_accepting_old().check_answer(&ex, &only_old().proof(Side::Responder, &ex)));
    }

    /// While a cluster turns its secret on, a member takes unsigned
    /// contexts too, but never a signed one whose MAC is wrong.
    #[test]
    fn accepting_the_unauthenticated_takes_unsigned_contexts_only() {
        let lenient = keys(b"a cluster secret of some length").with_unauthenticated(true);
        let mut bound = Vec::new();
        encode_context_into(&mut bound, &clock(), b"k", None);
        assert_eq!(check(&lenient, b"k", &bound), Ok(()));
        assert_eq!(check(&lenient, b"k", &clock().to_bytes()), Ok(()), "format 1");
        let forged = signed(&keys(b"another cluster's secret"), b"k", &clock());
        assert_eq!(check(&lenient, b"k", &forged), Err(VersionError::BadSignature));
        assert_eq!(check(&lenient.with_unauthenticated(false), b"k", &bound), Err(VersionError::Unsigned));
    }

    #[test]
    fn a_new_secret_file_is_random_owner_only_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        create_secret_file(&path).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.trim_end().len(), 64, "32 bytes as hex: {first:?}");
        assert!(first.ends_with('\n') && first.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(ClusterKeys::load(&path).is_ok());
        create_secret_file(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first, "an existing secret is kept");
        let other = dir.path().join("other.secret");
        create_secret_file(&other).unwrap();
        assert_ne!(std::fs::read_to_string(&other).unwrap(), first, "random");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no file left under another name");
    }

    #[test]
    fn secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        let with_newline = ClusterKeys::load(&path).unwrap();
        assert_eq!(with_newline.current().context, keys(b"0123456789abcdef").current().context, "the newline is cut");
        std::fs::write(&path, "short\n").unwrap();
        let e = ClusterKeys::load(&path).unwrap_err().to_string();
        assert!(e.contains("fewer than 16"), "{e}");
        std::fs::write(&path, vec![b'x'; MAX_SECRET_LEN + 1]).unwrap();
        let e = ClusterKeys::load(&path).unwrap_err().to_string();
        assert!(e.contains("more than 4096"), "{e}");
        let e = format!("{:#}", ClusterKeys::load(&dir.path().join("none")).unwrap_err());
        assert!(e.contains("reading cluster secret"), "{e}");
    }
}
