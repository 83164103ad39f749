//! Request keys and ranges: which object each request asks for. Pure; the
//! random source is a seeded xorshift so runs can be repeated.

use std::sync::Arc;

/// A small, fast, seedable PRNG (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How keys are drawn.
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    Uniform,
    /// Zipf with exponent `s`: key k (0-based) has weight 1/(k+1)^s.
    Zipf(f64),
}

impl Dist {
    pub fn parse(s: &str) -> Result<Dist, String> {
        if s == "uniform" {
            return Ok(Dist::Uniform);
        }
        if let Some(x) = s.strip_prefix("zipf:") {
            let v: f64 = x.parse().map_err(|_| format!("bad zipf exponent `{x}`"))?;
            if !(0.0..=10.0).contains(&v) {
                return Err(format!("zipf exponent {v} out of range 0..10"));
            }
            return Ok(Dist::Zipf(v));
        }
        Err(format!("unknown distribution `{s}` (uniform | zipf:S)"))
    }
}

/// The most keys a zipf table is built for (8 bytes each).
pub const MAX_ZIPF_KEYS: u64 = 50_000_000;

/// Draws keys in `0..n`. The zipf CDF is built once and shared by threads.
#[derive(Debug, Clone)]
pub struct Keys {
    n: u64,
    cdf: Option<Arc<Vec<f64>>>,
}

impl Keys {
    pub fn new(n: u64, dist: &Dist) -> Result<Keys, String> {
        if n == 0 {
            return Err("--keys must be at least 1".into());
        }
        let cdf = match dist {
            Dist::Uniform => None,
            Dist::Zipf(s) => {
                if n > MAX_ZIPF_KEYS {
                    return Err(format!("zipf supports at most {MAX_ZIPF_KEYS} keys"));
                }
                let mut acc = 0.0;
                let mut v = Vec::with_capacity(n as usize);
                for k in 0..n {
                    acc += 1.0 / ((k + 1) as f64).powf(*s);
                    v.push(acc);
                }
                for x in &mut v {
                    *x /= acc;
                }
                Some(Arc::new(v))
            }
        };
        Ok(Keys { n, cdf })
    }

    pub fn draw(&self, rng: &mut Rng) -> u64 {
        match &self.cdf {
            None => rng.below(self.n),
            Some(cdf) => {
                let u = rng.unit();
                (cdf.partition_point(|&c| c < u) as u64).min(self.n - 1)
            }
        }
    }
}

/// A random byte range of `size` within an object of `object_size`:
/// `(first, last)` inclusive, as a Range header wants.
pub fn random_range(rng: &mut Rng, size: u64, object_size: u64) -> (u64, u64) {
    let size = size.clamp(1, object_size.max(1));
    let start = rng.below(object_size.saturating_sub(size) + 1);
    (start, start + size - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_covers_all_keys() {
        let k = Keys::new(10, &Dist::Uniform).unwrap();
        let mut rng = Rng::new(1);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[k.draw(&mut rng) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }

    #[test]
    fn zipf_is_skewed_as_expected() {
        let k = Keys::new(1000, &Dist::Zipf(1.0)).unwrap();
        let mut rng = Rng::new(7);
        let mut seen = vec![0u32; 1000];
        let n = 200_000;
        for _ in 0..n {
            seen[k.draw(&mut rng) as usize] += 1;
        }
        // P(k=0) = 1/H(1000) ≈ 0.1336, P(k=1) half of that.
        let p0 = seen[0] as f64 / n as f64;
        let p1 = seen[1] as f64 / n as f64;
        assert!((p0 - 0.1336).abs() < 0.01, "p0 {p0}");
        assert!((p1 / p0 - 0.5).abs() < 0.05, "ratio {}", p1 / p0);
    }

    #[test]
    fn ranges_stay_inside() {
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let (a, b) = random_range(&mut rng, 16384, 1 << 20);
            assert_eq!(b - a + 1, 16384);
            assert!(b < 1 << 20);
        }
        assert_eq!(random_range(&mut rng, 100, 10), (0, 9));
    }

    #[test]
    fn parse_dist() {
        assert_eq!(Dist::parse("uniform"), Ok(Dist::Uniform));
        assert_eq!(Dist::parse("zipf:0.99"), Ok(Dist::Zipf(0.99)));
        assert!(Dist::parse("zipf:x").is_err());
        assert!(Dist::parse("normal").is_err());
    }
}
