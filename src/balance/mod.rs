//! Backend selection. Pure: the balancer sees weights and returns an index.
//!
//! For now every pool uses smooth weighted round robin (nginx's algorithm,
//! `ngx_http_upstream_round_robin.c`): each pick adds every backend's weight to
//! its current value, takes the largest, and subtracts the total from it, so
//! weights 5:1:1 give `a a b a c a a` rather than five `a`s in a row.

/// Smooth weighted round robin over a fixed set of weights.
#[derive(Debug, Clone)]
pub struct SmoothRoundRobin {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl SmoothRoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        SmoothRoundRobin {
            weights: weights.iter().map(|&w| i64::from(w.max(1))).collect(),
            current: vec![0; weights.len()],
            total: weights.iter().map(|&w| i64::from(w.max(1))).sum(),
        }
    }

    /// The next backend index; `None` only for an empty set.
    pub fn pick(&mut self) -> Option<usize> {
        if self.weights.is_empty() {
            return None;
        }
        let mut best = 0;
        for i in 0..self.weights.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_weights() {
        let mut rr = SmoothRoundRobin::new(&[5, 1, 1]);
        let seq: Vec<usize> = (0..7).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_rotate() {
        let mut rr = SmoothRoundRobin::new(&[1, 1, 1]);
        let seq: Vec<usize> = (0..6).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
    }

    proptest::proptest! {
        /// Over one full cycle every backend is picked exactly its weight.
        #[test]
        fn exact_over_a_cycle(weights in proptest::collection::vec(1u32..20, 1..8)) {
            let mut rr = SmoothRoundRobin::new(&weights);
            let total: u32 = weights.iter().sum();
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..total {
                counts[rr.pick().unwrap()] += 1;
            }
            proptest::prop_assert_eq!(counts, weights);
        }
    }
}
