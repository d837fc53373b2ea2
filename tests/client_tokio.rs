//! The async client against a real node process (`gyre node`, two shards).
#![cfg(feature = "tokio")]

mod common;

use std::time::{Duration, Instant};

use common::Node;
use gyre::client::tokio::AsyncClient;
use gyre::client::{ClientConfig, ClientError, Context};

/// A two-shard node on a fresh data directory. Bind as `(_dir, node)` so
/// the node is stopped before its directory is removed.
fn start() -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(dir.path(), &["--shards", "2", "--fsync", "never"]);
    assert_eq!(node.addrs.len(), 2);
    (dir, node)
}

fn config() -> ClientConfig {
    ClientConfig { request_timeout: Duration::from_secs(5), ..Default::default() }
}

async fn connect(node: &Node, which: usize) -> AsyncClient {
    AsyncClient::connect_with(&node.addrs[which], config()).await.expect("connect")
}

#[tokio::test]
async fn roundtrip_ping_and_stats() {
    let (_dir, node) = start();
    let client = connect(&node, 1).await;
    assert_eq!(client.node_info().ports.len(), 2);
    assert_eq!(client.ping().await.expect("ping").node_id, client.node_info().node_id);
    for shard in 0..2 {
        let stats: serde_json::Value = serde_json::from_str(&client.stats(shard).await.expect("stats")).unwrap();
        assert!(stats.is_object());
    }
    let empty = client.get(b"k").await.unwrap();
    assert!(empty.values.is_empty());
    let put = client.put(b"k", b"v1", &empty.context).await.unwrap();
    assert_eq!(put.siblings, 1);
    let got = client.get(b"k").await.unwrap();
    assert_eq!(got.values, vec![b"v1".to_vec()]);
    let put = client.put(b"k", b"v2", &got.context).await.unwrap();
    assert_eq!(put.siblings, 1, "a write with the read's context replaces it");
    let got = client.get(b"k").await.unwrap();
    assert_eq!(got.values, vec![b"v2".to_vec()]);
    client.delete(b"k", &got.context).await.unwrap();
    assert!(client.get(b"k").await.unwrap().values.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_tasks_share_the_client() {
    let (_dir, node) = start();
    let client = connect(&node, 0).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                let key = format!("key-{i}");
                let value = format!("value-{i}");
                let put = c.put(key.as_bytes(), value.as_bytes(), &Context::default()).await.unwrap();
                assert_eq!(put.siblings, 1, "{key}");
                let got = c.get(key.as_bytes()).await.unwrap();
                assert_eq!(got.values, vec![value.into_bytes()], "{key}");
                c.shard_of(key.as_bytes())
            })
        })
        .collect();
    let mut per_shard = [0; 2];
    for t in tasks {
        per_shard[t.await.unwrap()] += 1;
    }
    assert!(per_shard.iter().all(|&n| n > 0), "keys spread over both shards: {per_shard:?}");
    // And all at once from one task, through the same connections.
    let gets = (0..200).map(|i| {
        let c = &client;
        async move { (i, c.get(format!("key-{i}").as_bytes()).await) }
    });
    for (i, got) in futures_util::future::join_all(gets).await {
        assert_eq!(got.unwrap().values, vec![format!("value-{i}").into_bytes()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_make_siblings_and_update_collapses_them() {
    let (_dir, node) = start();
    let client = connect(&node, 0).await;
    client.put(b"counter", b"1", &Context::default()).await.unwrap();
    let seen = client.get(b"counter").await.unwrap();
    let (a, b) = tokio::join!(client.put(b"counter", b"2", &seen.context), client.put(b"counter", b"3", &seen.context));
    assert_eq!(a.unwrap().siblings.max(b.unwrap().siblings), 2);
    let mut both = client.get(b"counter").await.unwrap().values;
    both.sort();
    assert_eq!(both, vec![b"2".to_vec(), b"3".to_vec()]);
    let mut rounds = 0;
    let merged = client
        .update(b"counter", |values| {
            rounds += 1;
            let sum: u64 = values.iter().filter_map(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok()).sum();
            sum.to_string().into_bytes()
        })
        .await
        .unwrap();
    assert_eq!((merged.siblings, rounds), (1, 1));
    assert_eq!(client.get(b"counter").await.unwrap().values, vec![b"5".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_gives_errors_not_hangs() {
    let (_dir, mut node) = start();
    let client = connect(&node, 0).await;
    client.put(b"k", b"v", &Context::default()).await.unwrap();
    // Tasks busy reading when the node dies.
    let busy: Vec<_> = (0..20)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = c.get(b"k").await {
                        return e;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let started = Instant::now();
    let limit = config().request_timeout * 2;
    for t in busy {
        let e = tokio::time::timeout(limit, t).await.expect("a get hung").unwrap();
        assert!(matches!(e, ClientError::Io { .. } | ClientError::Timeout { .. }), "{e:?}");
    }
    let get = tokio::time::timeout(limit, client.get(b"k")).await.expect("get hung");
    assert!(matches!(get, Err(ClientError::Io { .. } | ClientError::Timeout { .. })), "{get:?}");
    let put = tokio::time::timeout(limit, client.put(b"k", b"x", &Context::default())).await.expect("put hung");
    assert!(put.is_err(), "{put:?}");
    assert!(started.elapsed() < limit, "took {:?}", started.elapsed());
}

/// In a cluster the async client routes by the ring, like the blocking
/// one: N = 2 of 4 nodes, so half the keys are not on any given node, yet
/// a client-driven client makes no node forward anything, while a
/// server-driven one through n1 does; both read the same values; a node
/// that stops is passed over for reads; R/W overrides travel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_it_routes_by_the_ring() {
    let mut cluster = common::Cluster::start(common::ClusterSpec { nodes: 4, n: 2, r: 1, w: 2, ..Default::default() });
    let client = AsyncClient::connect_with(&cluster.addr("n1"), config()).await.expect("connect");
    let view = client.ring().expect("a cluster client has the ring");
    assert_eq!((view.n, view.ring.members().len()), (2, 4));
    for i in 0..60 {
        let key = format!("k{i}");
        let put = client.put(key.as_bytes(), key.as_bytes(), &Context::default()).await.unwrap();
        assert_eq!(put.siblings, 1);
        assert_eq!(client.get(key.as_bytes()).await.unwrap().values, vec![key.into_bytes()]);
    }
    for name in cluster.names() {
        assert_eq!(cluster.counter(&name, "proxied"), 0, "{name} forwarded a client-driven request");
    }
    let server = ClientConfig { routing: gyre::client::Routing::Server, ..config() };
    let through_n1 = AsyncClient::connect_with(&cluster.addr("n1"), server).await.expect("connect");
    assert!(through_n1.ring().is_none(), "a server-driven client does not route by the ring");
    for i in 0..60 {
        let key = format!("k{i}");
        assert_eq!(through_n1.get(key.as_bytes()).await.unwrap().values, vec![key.into_bytes()]);
    }
    assert!(cluster.counter("n1", "proxied") > 0, "n1 is a replica of only some keys");
    // An override beyond N is refused by the node, not guessed at.
    let w3 = client.with_quorum(gyre::wire::Quorum { r: 0, w: 3 });
    let err = w3.put(b"k0", b"x", &Context::default()).await.unwrap_err();
    assert_eq!(err.code(), Some(gyre::wire::ErrorCode::InvalidQuorum), "{err}");
    // With n2 stopped every key still has a replica, and R = 1 reads go on.
    cluster.stop("n2");
    for i in 0..60 {
        let key = format!("k{i}");
        let got = client.get(key.as_bytes()).await.unwrap_or_else(|e| panic!("{key} with n2 stopped: {e}"));
        assert_eq!(got.values, vec![key.into_bytes()]);
    }
}
