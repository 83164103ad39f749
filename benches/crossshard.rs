//! What a cache lookup costs by path: a hit in this shard's hot set (L1,
//! no lock), a hit in this shard's own partition (its lock, uncontended),
//! and a hit in another shard's partition (that shard's lock), alone and
//! while another thread hammers the same partition. Prints a table;
//! `cargo bench --bench crossshard`.

use corral::cache::object::{meta_from_response, Object};
use corral::cache::policy::Timing;
use corral::cache::{unix_now, Partitions, ShardCache};
use corral::http::response::{parse_response, ResponseHead};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn object() -> Object {
    let resp = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=3600\r\nContent-Length: 1024\r\n\r\n";
    let mut head = ResponseHead::default();
    parse_response(resp, false, 4096, &mut head).expect("a valid head");
    let meta = meta_from_response(resp, &head);
    let now = unix_now();
    Object {
        timing: Timing::new(&meta.facts, now, now),
        lifetime: 3600,
        meta: Arc::new(meta),
        body: Arc::new(corral::cache::body::Body::new(vec![b'x'; 1024])),
        vary_values: Vec::new(),
        variant_of: None,
    }
}

/// A key owned by shard `owner` of 2.
fn key_of(owner: u64, i: u64) -> u64 {
    i * 2 + owner
}

fn time(label: &str, n: u64, mut f: impl FnMut(u64)) {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("| {label} | {ns:.0} ns |");
}

fn main() {
    let parts = Arc::new(Partitions::new(64 << 20, 2));
    let shard0 = ShardCache::new(0, parts.clone(), 64 << 20);
    let shard1 = ShardCache::new(1, parts.clone(), 64 << 20);
    let obj = object();
    let keys = 1000u64;
    for i in 0..keys {
        shard0.insert(key_of(0, i), obj.clone());
        shard1.insert(key_of(1, i), obj.clone());
    }
    let now = unix_now();
    let n = 2_000_000;
    println!("| lookup path (shard 0) | time per hit |");
    println!("|---|---|");
    time("own partition (lock, uncontended)", n, |i| {
        assert!(shard0.lookup(key_of(0, i % keys), now).is_some());
    });
    // First look-ups fill shard 0's hot set with shard 1's objects.
    for i in 0..keys {
        shard0.lookup(key_of(1, i), now);
    }
    time("another shard's object, in the hot set (no lock)", n, |i| {
        assert!(shard0.lookup(key_of(1, i % keys), now).is_some());
    });
    // Another thread (another shard) reads partition 1 as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (parts, stop) = (parts.clone(), stop.clone());
        std::thread::spawn(move || {
            let shard1 = ShardCache::new(1, parts, 64 << 20);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                std::hint::black_box(shard1.lookup(key_of(1, i % 1000), now));
                i += 1;
            }
        })
    };
    time(
        "own partition, while another thread reads partition 1",
        n,
        |i| {
            assert!(shard0.lookup(key_of(0, i % keys), now).is_some());
        },
    );
    let cold = ShardCache::new(0, parts.clone(), 0);
    time(
        "another shard's partition, contended (lock shared with a busy thread)",
        n,
        |i| {
            assert!(cold.lookup(key_of(1, i % keys), now).is_some());
        },
    );
    stop.store(true, Ordering::Relaxed);
    let _ = hammer.join();
    time(
        "another shard's partition, uncontended (no hot set)",
        n,
        |i| {
            assert!(cold.lookup(key_of(1, i % keys), now).is_some());
        },
    );
}
