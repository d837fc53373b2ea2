//! The blocking client against scripted fake nodes on loopback (std
//! threads, no `gyre node`): silent replicas, a shard that hangs up, a
//! listener whose accept queue is full. What a real node can only do by
//! accident (be stopped, drop a connection mid-batch) is under the test's
//! control here.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use gyre::client::{Client, ClientConfig, ClientError, Context, Routing};
use gyre::core::ring::{Member, Ring};
use gyre::wire::{decode_header, ErrorCode, Header, NodeInfo, Request, Response, HEADER_LEN, MAX_BODY_LEN};

/// Reads one request frame; `None` once the client hung up.
fn read_frame(s: &mut TcpStream) -> Option<(Header, Vec<u8>)> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).ok()?;
    let header = decode_header(&h, MAX_BODY_LEN).ok()?;
    let mut body = vec![0u8; header.body_len as usize];
    s.read_exact(&mut body).ok()?;
    Some((header, body))
}

/// A listener on a free loopback port that accepts every connection and
/// never reads or answers a byte: a stopped node, as its peers see it.
fn silent_listener() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            held.push(s);
        }
    });
    addr
}

/// A fake node on `l` (its shard 0): PING with `info`, RING with `ring` if
/// given (n = 3) or a NotClustered error, a GET with the value "v", a PUT
/// with success.
fn fake_node(l: TcpListener, info: NodeInfo, ring: Option<Ring>) -> SocketAddr {
    let ring = ring.map(|r| r.to_bytes());
    scripted_node(l, move |id, req| {
        Then::Reply(frame(
            match req {
                Request::Ping => Response::Pong(info.clone()),
                Request::Ring => match &ring {
                    Some(ring) => Response::Ring { n: 3, r: 2, w: 2, ring },
                    None => Response::Error { code: gyre::wire::ErrorCode::NotClustered, message: "lone" },
                },
                Request::Get { .. } => Response::Get { context: b"", values: vec![b"v"] },
                Request::Put { .. } => Response::Put { context: b"", siblings: 1 },
                other => panic!("fake node got {other:?}"),
            },
            id,
        ))
    })
}

/// A shard port that reads one request on each connection and hangs up
/// without answering.
fn hang_up_listener() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = read_frame(&mut s);
        }
    });
    addr
}

fn info(ports: Vec<u16>) -> NodeInfo {
    NodeInfo { node_id: 7, partitions: 64, shard: 0, ports }
}

/// A fake seed node whose ring has three members, every one silent
/// ([`silent_listener`]).
fn seed_of_silent_replicas() -> SocketAddr {
    let members: Vec<Member> =
        (0..3).map(|i| Member { name: format!("n{i}"), addr: silent_listener(), zone: None }).collect();
    let ring = Ring::with_members(64, members).expect("ring");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    fake_node(l, info(vec![port]), Some(ring))
}

/// With every replica of a key silent (accepting connections, answering
/// nothing), a call fails with a timeout once its one deadline has passed,
/// not after a full timeout per replica tried.
#[test]
fn a_call_ends_by_its_deadline_however_many_replicas_are_silent() {
    let seed = seed_of_silent_replicas();
    // Long enough that a loaded machine's scheduling fits well within the
    // bound below, and paying the timeout per member (three times it)
    // stays past it (found by a review: 300 ms and 750 ms left 450 ms of
    // slack).
    let timeout = Duration::from_millis(1500);
    let config = ClientConfig {
        request_timeout: timeout,
        connect_timeout: timeout,
        routing: Routing::Client,
        ..Default::default()
    };
    let mut client = Client::connect_with(&seed.to_string(), config).expect("connect to the seed");
    assert_eq!(client.ring().expect("routes by the ring").ring.members().len(), 3);
    // Well short of what paying the timeout per member took (about
    // three times it), with room for a loaded machine's scheduling.
    let bound = timeout * 5 / 2;
    for round in 0..2 {
        let started = Instant::now();
        let put = client.put(b"k", b"v", &Context::default());
        let took = started.elapsed();
        assert!(matches!(put, Err(ClientError::Timeout { .. })), "round {round}: {put:?}");
        assert!(took < bound, "round {round}: a put with a {timeout:?} timeout took {took:?}");
        let started = Instant::now();
        let get = client.get(b"k");
        let took = started.elapsed();
        assert!(matches!(get, Err(ClientError::Timeout { .. })), "round {round}: {get:?}");
        assert!(took < bound, "round {round}: a get with a {timeout:?} timeout took {took:?}");
    }
}

/// Found by a review: the blocking client routed a request no node takes
/// (an over-long key) before checking it, so with silent replicas it
/// failed with a timeout, not as invalid, after trying them. It is refused
/// first now, at once, as the async client does.
#[test]
fn an_invalid_request_is_refused_before_it_is_routed() {
    let seed = seed_of_silent_replicas();
    let config = ClientConfig { routing: Routing::Client, ..Default::default() };
    let mut client = Client::connect_with(&seed.to_string(), config).expect("connect to the seed");
    let long = vec![b'k'; gyre::limits::MAX_KEY_LEN + 1];
    let started = Instant::now();
    let put = client.put(&long, b"v", &Context::default());
    assert!(matches!(put, Err(ClientError::Invalid(_))), "{put:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once: {:?}", started.elapsed());
}

/// A replica that accepts connections but never answers costs a call at
/// most the connect timeout (its TCP connect and PING handshake), so the
/// rest of the call's deadline is left to the next replica.
#[test]
fn a_silent_replica_costs_a_call_only_the_connect_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let good = l.local_addr().unwrap();
    let members = vec![
        Member { name: "silent1".into(), addr: silent_listener(), zone: None },
        Member { name: "silent2".into(), addr: silent_listener(), zone: None },
        Member { name: "good".into(), addr: good, zone: None },
    ];
    let ring = Ring::with_members(64, members).expect("ring");
    let seed = fake_node(l, info(vec![good.port()]), Some(ring));
    let (connect_timeout, request_timeout) = (Duration::from_millis(200), Duration::from_secs(6));
    let config = ClientConfig { request_timeout, connect_timeout, routing: Routing::Client, ..Default::default() };
    let mut client = Client::connect_with(&seed.to_string(), config).expect("connect to the seed");
    let view = client.ring().expect("routes by the ring");
    // A key whose replicas are tried silent ones first.
    let key = (0..)
        .map(|i| format!("k{i}").into_bytes())
        .find(|k| view.prefs.of_key(k).last().is_some_and(|&m| view.ring.member(m).addr == good))
        .expect("a key");
    let started = Instant::now();
    let put = client.put(&key, b"v", &Context::default()).expect("the put reaches the answering replica");
    assert_eq!(put.siblings, 1);
    let took = started.elapsed();
    // Two connect timeouts and the answer, not the call's deadline: a
    // success alone would allow up to it.
    assert!(took < request_timeout / 2, "took {took:?}");
    assert_eq!(client.get(&key).expect("get").values, vec![b"v".to_vec()]);
}

/// The keys' shards on a two-shard fake node: one key owned by shard 0,
/// one by shard 1.
fn keys_by_shard(client: &Client) -> (Vec<u8>, Vec<u8>) {
    let key = |shard| (0..).map(|i| format!("k{i}").into_bytes()).find(|k| client.shard_of(k) == shard).expect("a key");
    (key(0), key(1))
}

/// A `get_many` that stops on an error (a shard hanging up, a key the
/// protocol refuses) leaves no reply owed on any connection: the next
/// calls read their own replies, not a stale one.
#[test]
fn a_failed_get_many_leaves_the_client_usable() {
    // Shard 0 answers; shard 1 reads a request and hangs up.
    let bad = hang_up_listener();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let good_port = l.local_addr().unwrap().port();
    let seed = fake_node(l, info(vec![good_port, bad.port()]), None);
    let config =
        ClientConfig { request_timeout: Duration::from_secs(5), routing: Routing::Server, ..Default::default() };
    let mut client = Client::connect_with(&seed.to_string(), config).expect("connect");
    let (k0, k1) = keys_by_shard(&client);
    let (k0, k1) = (k0.as_slice(), k1.as_slice());
    assert_eq!(client.get(k0).expect("shard 0 answers").values, vec![b"v".to_vec()]);
    // Shard 1 fails first (shard 0's request queued or sent, unread), or
    // after shard 0 answered part of the batch (one reply still owed).
    let batches: [&[&[u8]]; 3] = [&[k1, k0], &[k0, k1, k0], &[k0, k0, k1, k0]];
    for batch in batches {
        let batch_text: Vec<_> = batch.iter().map(|k| String::from_utf8_lossy(k)).collect();
        let err = client.get_many(batch).expect_err("shard 1 hangs up");
        assert!(matches!(err, ClientError::Io { .. } | ClientError::Timeout { .. }), "{err:?}");
        let got = client.get(k0).unwrap_or_else(|e| panic!("get after a failed get_many of {batch_text:?}: {e}"));
        assert_eq!(got.values, vec![b"v".to_vec()]);
        let many = client.get_many(&[k0, k0]).unwrap_or_else(|e| panic!("get_many after {batch_text:?}: {e}"));
        assert!(many.iter().all(|r| r.as_ref().is_ok_and(|v| v.values == [b"v".to_vec()])), "{many:?}");
    }
    // A key the protocol refuses, after one already queued.
    let err = client.get_many(&[k0, b"", k0]).expect_err("an empty key is refused");
    assert!(matches!(err, ClientError::Invalid(_)), "{err:?}");
    assert_eq!(client.get(k0).expect("get after a refused get_many").values, vec![b"v".to_vec()]);
    assert_eq!(client.ping().expect("ping").ports, vec![good_port, bad.port()]);
}

/// A connect that times out is a [`ClientError::Timeout`], as in the
/// async client, not an I/O error. A real connect timeout on loopback: a
/// listener whose accept queue is full (backlog 0, never accepting) makes
/// Linux drop the SYNs of further connects, so they hang until their
/// timeout.
#[cfg(target_os = "linux")]
#[test]
fn a_connect_timeout_is_a_timeout_error() {
    use std::os::fd::AsRawFd;

    use gyre::client::Connection;

    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    // SAFETY: a plain listen(2) on a socket this test owns.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0, "listen with backlog 0");
    // Fill the accept queue until a connect hangs.
    let mut queued = Vec::new();
    let full = (0..16).any(|_| match TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
        Ok(s) => {
            queued.push(s);
            false
        }
        Err(_) => true,
    });
    assert!(full, "the accept queue never filled");
    let limit = Duration::from_millis(200);
    let config = ClientConfig { connect_timeout: limit, ..Default::default() };
    let started = Instant::now();
    let err = Connection::connect(addr, &config).err().expect("the connect times out");
    assert!(matches!(err, ClientError::Timeout { addr: a, timeout } if a == addr && timeout == limit), "{err:?}");
    assert!(started.elapsed() < limit * 5, "took {:?}", started.elapsed());
    let err = Client::connect_with(&addr.to_string(), config).err().expect("the connect times out");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    drop(queued);
}

/// A node on `l` that completes the handshake (PING, with `info`) but
/// never answers a read: a node that hangs after the client connected.
fn read_hanging_node(l: TcpListener, info: NodeInfo, unanswered: Arc<AtomicUsize>) -> SocketAddr {
    scripted_node(l, move |id, req| match req {
        Request::Ping => Then::Reply(frame(Response::Pong(info.clone()), id)),
        _ => {
            unanswered.fetch_add(1, Ordering::SeqCst);
            Then::Ignore
        }
    })
}

/// A ring of a replica that hangs after the handshake, one that answers
/// (the seed) and one that is silent, a client routing by it with
/// `request_timeout`, and a key tried on the hung replica first and the
/// answering one second; also the count of requests the hung replica got
/// (and never answered).
fn hung_then_good(request_timeout: Duration) -> (Client, Vec<u8>, Arc<AtomicUsize>) {
    let hung_l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung = hung_l.local_addr().unwrap();
    let unanswered = Arc::new(AtomicUsize::new(0));
    read_hanging_node(hung_l, info(vec![hung.port()]), unanswered.clone());
    let config = ClientConfig {
        request_timeout,
        connect_timeout: Duration::from_millis(300),
        routing: Routing::Client,
        ..Default::default()
    };
    let (client, key, _) = first_then_good(hung, config);
    (client, key, unanswered)
}

/// A ring of `first`, a node that answers (the seed) and one that is
/// silent; a client routing by it with `config`, a key tried on `first`
/// first and the answering node second, and the seed.
fn first_then_good(first: SocketAddr, config: ClientConfig) -> (Client, Vec<u8>, SocketAddr) {
    let good_l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let good = good_l.local_addr().unwrap();
    let members = vec![
        Member { name: "first".into(), addr: first, zone: None },
        Member { name: "good".into(), addr: good, zone: None },
        Member { name: "silent".into(), addr: silent_listener(), zone: None },
    ];
    let ring = Ring::with_members(64, members).expect("ring");
    let seed = fake_node(good_l, info(vec![good.port()]), Some(ring));
    let client = Client::connect_with(&seed.to_string(), config).expect("connect to the seed");
    let view = client.ring().expect("routes by the ring");
    let key = (0..)
        .map(|i| format!("k{i}").into_bytes())
        .find(|k| {
            let prefs = view.prefs.of_key(k);
            view.ring.member(prefs[0]).addr == first && view.ring.member(prefs[1]).addr == good
        })
        .expect("a key");
    (client, key, seed)
}

/// A read whose first replica hangs after the handshake still reaches the
/// next one before the call's deadline: each replica tried gets a share of
/// what is left, not all of it.
#[test]
fn a_read_moves_on_from_a_replica_that_hangs_in_time_for_the_next() {
    let request_timeout = Duration::from_secs(6);
    let (mut client, key, _) = hung_then_good(request_timeout);
    let started = Instant::now();
    let got = client.get(&key).expect("the read reaches the answering replica");
    assert_eq!(got.values, vec![b"v".to_vec()]);
    // The hung replica's share (a third of the deadline) and the answer:
    // a success alone would allow the whole deadline.
    assert!(started.elapsed() < request_timeout * 2 / 3, "took {:?}", started.elapsed());
}

/// A write that timed out on a replica puts that replica last for a
/// while, as a read does: the next write goes to another replica first
/// instead of waiting out the timeout again. (The write that timed out is
/// not resent: it may have been taken.)
#[test]
fn a_write_that_timed_out_puts_its_replica_last_for_the_next_call() {
    let (mut client, key, unanswered) = hung_then_good(Duration::from_millis(600));
    let first = client.put(&key, b"v", &Context::default());
    assert!(matches!(first, Err(ClientError::Timeout { .. })), "sent once, to the hung replica: {first:?}");
    assert_eq!(unanswered.load(Ordering::SeqCst), 1);
    // Sent to the hung replica first again, it would time out again (a
    // write is never resent to the next).
    let second = client.put(&key, b"v", &Context::default()).expect("the next write goes to the good replica");
    assert_eq!(second.siblings, 1);
    assert_eq!(unanswered.load(Ordering::SeqCst), 1, "the hung replica got the second write");
}

/// Regression: a RING reply with a ring of no members (which decodes) or
/// N = 0 panicked the client as it built its routing table; it is a
/// protocol error, at connect as at any refresh.
#[test]
fn a_ring_that_routes_no_key_is_a_protocol_error_not_a_panic() {
    for (ring, n) in [
        (Ring::new(64).expect("an empty ring"), 3u8),
        (Ring::with_members(64, vec![Member { name: "a".into(), addr: silent_listener(), zone: None }]).unwrap(), 0),
    ] {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().unwrap().port();
        let ring = ring.to_bytes();
        scripted_node(l, move |id, req| {
            Then::Reply(frame(
                match req {
                    Request::Ping => Response::Pong(info(vec![port])),
                    Request::Ring => Response::Ring { n, r: 1, w: 1, ring: &ring },
                    other => panic!("fake node got {other:?}"),
                },
                id,
            ))
        });
        let config = ClientConfig { request_timeout: Duration::from_secs(2), ..Default::default() };
        match Client::connect_with(&format!("127.0.0.1:{port}"), config) {
            Err(ClientError::Protocol { reason, .. }) => assert!(reason.contains("routes no key"), "{reason}"),
            Err(e) => panic!("N = {n}: not a protocol error: {e}"),
            Ok(_) => panic!("N = {n}: a client routing by a ring that routes no key"),
        }
    }
}

/// Regression (found by a review): an error reply flagged STALE_ROUTE (a
/// node that is no replica relays its replica's error flagged) did not make
/// the client fetch the ring again; only a successful one did.
#[test]
fn an_error_reply_flagged_stale_route_refreshes_the_ring() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    let ring = Ring::with_members(64, vec![Member { name: "a".into(), addr, zone: None }]).unwrap().to_bytes();
    let rings = Arc::new(AtomicUsize::new(0));
    let asked = rings.clone();
    scripted_node(l, move |id, req| {
        Then::Reply(match req {
            Request::Ping => frame(Response::Pong(info(vec![addr.port()])), id),
            Request::Ring => {
                asked.fetch_add(1, Ordering::SeqCst);
                frame(Response::Ring { n: 1, r: 1, w: 1, ring: &ring }, id)
            }
            Request::Get { .. } => {
                let mut out = frame(Response::Error { code: ErrorCode::QuorumFailed, message: "relayed" }, id);
                gyre::wire::patch_reply(&mut out, id, gyre::wire::flags::STALE_ROUTE);
                out
            }
            other => panic!("fake node got {other:?}"),
        })
    });
    let config = ClientConfig { request_timeout: Duration::from_secs(2), ..Default::default() };
    let mut client = Client::connect_with(&addr.to_string(), config).expect("connect");
    assert_eq!(rings.load(Ordering::SeqCst), 1, "the ring fetched at connect");
    let err = client.get(b"k").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::QuorumFailed), "{err:?}");
    assert_eq!(rings.load(Ordering::SeqCst), 2, "the flagged error reply did not refresh the ring");
}

/// A node on `l` that completes the handshake (PING, with `info`) and
/// answers every other request with the error `code` (a node that is
/// stopping, or overloaded).
fn refusing_node(l: TcpListener, info: NodeInfo, code: gyre::wire::ErrorCode) -> SocketAddr {
    scripted_node(l, move |id, req| {
        Then::Reply(match req {
            Request::Ping => frame(Response::Pong(info.clone()), id),
            _ => frame(Response::Error { code, message: "bye" }, id),
        })
    })
}

/// A read whose first replica is stopping (or overloaded) moves on to the
/// next, as from one that is unreachable (found by a review: it failed
/// with the first one's error during a rolling restart). A write does
/// not: it may have been taken.
#[test]
fn a_read_moves_on_from_a_replica_that_is_stopping_and_a_write_does_not() {
    for code in [gyre::wire::ErrorCode::ShuttingDown, gyre::wire::ErrorCode::Overloaded] {
        let down_l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let down = down_l.local_addr().unwrap();
        refusing_node(down_l, info(vec![down.port()]), code);
        let config = ClientConfig { routing: Routing::Client, ..Default::default() };
        let (mut client, key, seed) = first_then_good(down, config.clone());
        let got = client.get(&key).unwrap_or_else(|e| panic!("{code:?}: the read stopped at the first replica: {e}"));
        assert_eq!(got.values, vec![b"v".to_vec()], "{code:?}");
        // The refusing replica is now tried last by this client: a fresh
        // one, which tries it first, shows a write stopping there.
        let mut fresh = Client::connect_with(&seed.to_string(), config).expect("connect to the seed");
        let err = fresh.put(&key, b"w", &gyre::client::Context::default()).unwrap_err();
        assert_eq!(err.code(), Some(code), "a write is not resent: {err}");
    }
}

/// A client that sends everything to the node given, with a 2 s timeout.
fn server_routed() -> ClientConfig {
    ClientConfig { request_timeout: Duration::from_secs(2), routing: Routing::Server, ..Default::default() }
}

/// The reply frame of `resp` to request `id`.
fn frame(resp: Response<'_>, id: u64) -> Vec<u8> {
    let mut out = Vec::new();
    resp.encode(&mut out, id, 0);
    out
}

/// What a scripted fake node does after a request.
enum Then {
    /// Writes this reply frame and reads the next request.
    Reply(Vec<u8>),
    /// Writes this reply frame and closes the connection.
    ReplyAndClose(Vec<u8>),
    /// Reads the next request without a reply (a node that hangs).
    Ignore,
}

/// A fake node on `l` serving each connection in a thread of its own:
/// `answer(id, request)` says what to do with each request.
fn scripted_node(l: TcpListener, answer: impl Fn(u64, Request<'_>) -> Then + Send + Sync + 'static) -> SocketAddr {
    scripted_node_telling_closes(l, answer, None)
}

/// [`scripted_node`] that also sends on `closed` once it has closed a
/// connection.
fn scripted_node_telling_closes(
    l: TcpListener,
    answer: impl Fn(u64, Request<'_>) -> Then + Send + Sync + 'static,
    closed: Option<std::sync::mpsc::Sender<()>>,
) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    let answer = Arc::new(answer);
    thread::spawn(move || {
        for s in l.incoming() {
            let (Ok(mut s), answer, closed) = (s, answer.clone(), closed.clone()) else { continue };
            thread::spawn(move || {
                while let Some((h, body)) = read_frame(&mut s) {
                    let req = Request::decode(h.opcode, &body).expect("a request");
                    let (out, close) = match answer(h.request_id, req) {
                        Then::Reply(out) => (out, false),
                        Then::ReplyAndClose(out) => (out, true),
                        Then::Ignore => continue,
                    };
                    if s.write_all(&out).is_err() || close {
                        break;
                    }
                }
                drop(s);
                if let Some(tx) = closed {
                    let _ = tx.send(());
                }
            });
        }
    });
    addr
}

/// Found by a review: the client reused a connection the node had closed
/// while it sat idle (a node restarted meanwhile). A write sent into it
/// failed as "may have been taken" though no node ever saw it, and
/// `get_many` and `stats`, which are not retried, failed outright. An
/// idle connection is now looked at before reuse.
#[test]
fn a_connection_the_node_closed_while_idle_is_not_reused() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let writes = Arc::new(AtomicUsize::new(0));
    let seen = writes.clone();
    // Every connection is closed after its first reply (the PING's, for
    // the client's first one); `closed` hears of each close.
    let (closed_tx, closed) = std::sync::mpsc::channel();
    let answer = move |id, req: Request<'_>| {
        if let Request::Put { .. } = req {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        let reply = match req {
            Request::Ping => frame(Response::Pong(info(vec![port])), id),
            Request::Put { .. } => frame(Response::Put { context: b"", siblings: 1 }, id),
            Request::Get { .. } => frame(Response::Get { context: b"", values: vec![b"v"] }, id),
            Request::Stats => frame(Response::Stats("{}"), id),
            other => panic!("fake node got {other:?}"),
        };
        Then::ReplyAndClose(reply)
    };
    let addr = scripted_node_telling_closes(l, answer, Some(closed_tx));
    let config = server_routed();
    let mut client = Client::connect_with(&addr.to_string(), config).expect("connect");
    // Each call comes once the node has closed the connection the last
    // one used (found by a review: a 100 ms sleep stood for that), and its
    // end of stream has crossed loopback (within the close; a millisecond
    // more for a busy machine, as in the test below).
    let wait_for_close = || {
        closed.recv_timeout(Duration::from_secs(5)).expect("the node closes the connection");
        thread::sleep(Duration::from_millis(1));
    };
    wait_for_close();
    client.put(b"k", b"v", &Context::default()).expect("sent on a new connection");
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    wait_for_close();
    let many = client.get_many(&[b"k"]).expect("get_many on a new connection");
    assert!(many.iter().all(|r| r.as_ref().is_ok_and(|v| v.values == [b"v".to_vec()])), "{many:?}");
    wait_for_close();
    assert_eq!(client.stats(0).expect("stats on a new connection"), "{}");
}

/// Found by a review: the reply of a replica message to a client's
/// request was reported as the client's own invalid request
/// (`ClientError::Invalid`), not as the node breaking the protocol.
#[test]
fn a_replica_messages_reply_to_a_client_request_is_a_protocol_error() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let addr = scripted_node(l, move |id, req| {
        Then::Reply(match req {
            Request::Ping => frame(Response::Pong(info(vec![port])), id),
            _ => frame(Response::ReplicaPut, id),
        })
    });
    let config = server_routed();
    let mut client = Client::connect_with(&addr.to_string(), config).expect("connect");
    let err = client.get(b"k").unwrap_err();
    assert!(matches!(err, ClientError::Protocol { addr: a, .. } if a == addr), "{err:?}");
}

/// A node that stops answers its last request and closes the connection
/// at once: a client calling again straight away must see that, not send
/// a write into the closed connection (found by a review: a 1 ms idle
/// threshold on the look let 20 of 20 such writes fail as "may have been
/// taken").
#[test]
fn a_connection_closed_right_after_its_reply_is_not_reused() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let (closed_tx, closed) = std::sync::mpsc::channel();
    let answer = move |id, req: Request<'_>| {
        Then::ReplyAndClose(match req {
            Request::Ping => frame(Response::Pong(info(vec![port])), id),
            Request::Put { .. } => frame(Response::Put { context: b"", siblings: 1 }, id),
            other => panic!("fake node got {other:?}"),
        })
    };
    let addr = scripted_node_telling_closes(l, answer, Some(closed_tx));
    let config = server_routed();
    let mut failed = Vec::new();
    let wait_for_close = || closed.recv_timeout(Duration::from_secs(5)).expect("the node closes the connection");
    for _ in 0..20 {
        let mut client = Client::connect_with(&addr.to_string(), config.clone()).expect("connect");
        // The node has closed the PING's connection (its end of stream
        // crosses loopback within the close; a millisecond more for a
        // busy machine), well under any idle threshold.
        wait_for_close();
        thread::sleep(Duration::from_millis(1));
        match client.put(b"k", b"v", &Context::default()) {
            // Its connection is closed too.
            Ok(_) => wait_for_close(),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(failed.is_empty(), "{} of 20 writes sent into a closed connection: {:?}", failed.len(), failed.first());
}

/// A node at its connection limit answers a new connection with one error
/// frame for request id 0, and closes it: the client reports that error
/// (`Overloaded`), not a protocol error about a reply to no request.
#[test]
fn a_connection_the_node_refuses_fails_with_its_reason() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = scripted_node(l, move |_, _| {
        let refusal = Response::Error { code: ErrorCode::Overloaded, message: "too many connections" };
        Then::ReplyAndClose(frame(refusal, 0))
    });
    let err = Client::connect_with(&addr.to_string(), server_routed()).err().expect("refused");
    assert!(matches!(&err, ClientError::Server { code: ErrorCode::Overloaded, .. }), "{err:?}");
}

/// Found by a review: a bare `Connection` whose flush timed out part-way
/// through a frame was marked broken but still took requests; the next
/// request's bytes went out behind the cut frame, and the node read them
/// as the rest of its body (a PUT of a value the client never sent).
#[test]
fn a_connection_cut_mid_frame_takes_no_further_request() {
    use gyre::client::Connection;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // A node that reads nothing until the client's flush has timed out.
        thread::sleep(Duration::from_millis(800));
        let _ = tx.send(read_frame(&mut s).map(|(h, body)| (h.opcode, body)));
    });
    let sent_value = vec![b'a'; 8 * 1024 * 1024];
    let config = ClientConfig { request_timeout: Duration::from_millis(300), ..Default::default() };
    let mut conn = Connection::connect(addr, &config).expect("connect");
    conn.send(&Request::Put { key: b"k1", context: b"", value: &sent_value }, 0).unwrap();
    let err = conn.flush().expect_err("the node reads nothing: the flush times out part-way");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(conn.is_broken());
    let other = vec![b'b'; 8 * 1024 * 1024];
    let again = conn.send(&Request::Put { key: b"k2", context: b"", value: &other }, 0);
    let err = again.expect_err("a broken connection takes no request");
    assert!(err.to_string().contains("cannot be used again"), "{err}");
    assert!(conn.flush().is_err() && conn.recv().is_err(), "nor writes or reads");
    drop(conn);
    // The node read the first PUT's head and part of its value, and then
    // the end of the stream: never a whole frame made of another
    // request's bytes.
    let read = rx.recv_timeout(Duration::from_secs(10)).expect("the node read");
    assert!(read.is_none(), "the node read a whole frame: {:?}", read.map(|(op, body)| (op, body.len())));
}

/// Found by a review: `gyre put` against a node that took the write and
/// never answered said only that no reply came; running it again adds a
/// sibling if the first was stored. The message now says so.
#[test]
fn a_cli_write_that_timed_out_says_it_may_have_been_stored() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let addr = scripted_node(l, move |id, req| match req {
        Request::Ping => Then::Reply(frame(Response::Pong(info(vec![port])), id)),
        Request::Ring => Then::Reply(frame(Response::Error { code: ErrorCode::NotClustered, message: "lone" }, id)),
        _ => Then::Ignore,
    });
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gyre"));
    command.args(["put", "k", "v", "--node", &addr.to_string(), "--timeout", "1"]);
    command.env_remove("RUST_LOG").env_remove("RUST_BACKTRACE");
    let out = common::output_bounded(command, b"", common::COMMAND_TIMEOUT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("may have been stored") && err.contains("no reply"), "{err}");
}

/// A ring as the RING reply carries it (format 1, `gyre::core::ring`):
/// `partitions` partitions, a member on 127.0.0.1 at each of `ports`, and
/// every partition owned by the first (a ring that decodes: a member may
/// own nothing).
fn lopsided_ring(partitions: u32, ports: &[u16]) -> Vec<u8> {
    let mut b = vec![1u8];
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&partitions.to_le_bytes());
    b.extend_from_slice(&(ports.len() as u16).to_le_bytes());
    for (i, port) in ports.iter().enumerate() {
        let name = format!("m{i}");
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.push(4);
        b.extend_from_slice(&[127, 0, 0, 1]);
        b.extend_from_slice(&port.to_le_bytes());
        b.push(0);
    }
    for _ in 0..partitions {
        b.extend_from_slice(&0u16.to_le_bytes());
    }
    b
}

/// A connect ends within its timeout whatever ring the node sends (found
/// by a review: with 65,536 partitions all owned by one of three members,
/// building the preference lists walked the whole ring twice for each
/// partition, and a connect with a 1 s timeout ran for seconds; `gyre
/// ring` for half a minute). The lists are built in one sweep now; a
/// member that owns nothing is still routed to, after the owners.
#[test]
fn a_lopsided_ring_is_taken_within_the_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let ring = lopsided_ring(1 << 16, &[port, port + 1, port + 2]);
    Ring::decode(&ring).expect("the ring decodes");
    scripted_node(l, move |id, req| {
        Then::Reply(frame(
            match req {
                Request::Ping => Response::Pong(info(vec![port])),
                Request::Ring => Response::Ring { n: 3, r: 2, w: 2, ring: &ring },
                other => panic!("fake node got {other:?}"),
            },
            id,
        ))
    });
    let timeout = Duration::from_secs(2);
    let config = ClientConfig { request_timeout: timeout, ..Default::default() };
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    thread::spawn(move || {
        let client = Client::connect_with(&format!("127.0.0.1:{port}"), config);
        let _ = tx.send((client.map(|c| c.ring().map(|r| r.prefs.of_partition(0).to_vec())), started.elapsed()));
    });
    match rx.recv_timeout(timeout * 5) {
        Ok((Ok(lists), took)) => {
            assert!(took < timeout, "connect took {took:?}, past its {timeout:?}");
            assert_eq!(lists, Some(vec![0, 1, 2]), "the owner, then the members that own nothing");
        }
        Ok((Err(e), _)) => panic!("connect: {e}"),
        Err(_) => panic!("connect with a {timeout:?} timeout still running after {:?}", started.elapsed()),
    }
}

/// A write the node stored but whose reply the client cannot read (a
/// reply flag this client does not know, as a newer node might set) may
/// have landed (found by a review: a protocol error said it had not, and
/// the CLI gave no warning before a second write added a sibling).
#[test]
fn a_stored_write_whose_reply_cannot_be_read_may_have_landed() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let stored = Arc::new(AtomicUsize::new(0));
    let seen = stored.clone();
    let addr = scripted_node(l, move |id, req| {
        Then::Reply(match req {
            Request::Ping => frame(Response::Pong(info(vec![port])), id),
            Request::Put { .. } => {
                seen.fetch_add(1, Ordering::SeqCst);
                let mut out = frame(Response::Put { context: b"", siblings: 1 }, id);
                out[4] |= 0x02;
                out
            }
            other => panic!("fake node got {other:?}"),
        })
    });
    let mut client = Client::connect_with(&addr.to_string(), server_routed()).expect("connect");
    let err = client.put(b"k", b"v", &Context::default()).unwrap_err();
    assert_eq!(stored.load(Ordering::SeqCst), 1, "the node took the write");
    assert!(matches!(err, ClientError::Protocol { .. }), "{err:?}");
    assert!(err.write_may_have_landed(), "{err:?}");
}
