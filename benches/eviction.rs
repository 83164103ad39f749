//! Hit ratio of S3-FIFO (corral's store) against LRU on zipf traces, at
//! several cache sizes. Prints a table; `cargo bench --bench eviction`.

use corral::cache::store::{Lru, Store};
use loadgen::keys::{Dist, Keys, Rng};

fn main() {
    let keys_n = 1_000_000u64;
    let requests = 5_000_000;
    println!("| zipf s | cache (objects) | LRU hit ratio | S3-FIFO hit ratio | S3-FIFO ÷ LRU |");
    println!("|---|---|---|---|---|");
    for s in [0.8, 1.0, 1.2] {
        let keys = Keys::new(keys_n, &Dist::Zipf(s)).expect("zipf table");
        for pct in [0.1, 1.0, 10.0] {
            let budget = (keys_n as f64 * pct / 100.0) as u64;
            let mut store: Store<()> = Store::new(budget);
            let mut lru = Lru::new(budget);
            let mut rng = Rng::new(7);
            let (mut hs, mut hl) = (0u64, 0u64);
            for _ in 0..requests {
                let k = keys.draw(&mut rng);
                if store.get(k).is_some() {
                    hs += 1;
                } else {
                    store.insert(k, (), 1);
                }
                hl += u64::from(lru.access(k, 1));
            }
            let (rs, rl) = (hs as f64 / requests as f64, hl as f64 / requests as f64);
            println!(
                "| {s} | {budget} ({pct}%) | {rl:.4} | {rs:.4} | {:.3} |",
                rs / rl
            );
        }
    }
}
