//! Random inputs for the property tests of the pure cores (a long soak in
//! place of a fuzzer until `fuzz/` exists): a fixed-seed xorshift generator,
//! so a failure repeats, and `POSTERN_PROPTEST_SCALE=N` to run N times as
//! many cases, each scale from its own seed.

/// (rounds, seed) for a property with `base` rounds and `seed`.
pub(crate) fn scaled(base: usize, seed: u64) -> (usize, u64) {
    let n: usize = std::env::var("POSTERN_PROPTEST_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    (base * n.max(1), seed ^ (n as u64).wrapping_mul(0x9e37_79b9))
}

/// Runs `case` for each of the (scaled) `base` rounds of a property.
pub(crate) fn cases(base: usize, seed: u64, mut case: impl FnMut(&mut Rng)) {
    let (rounds, seed) = scaled(base, seed);
    let mut rng = Rng(seed);
    for _ in 0..rounds {
        case(&mut rng);
    }
}

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(crate) fn pick(&mut self, from: &[u8]) -> u8 {
        from[self.below(from.len())]
    }

    /// Fewer than `max` bytes drawn from `from`.
    pub(crate) fn bytes(&mut self, max: usize, from: &[u8]) -> Vec<u8> {
        let n = self.below(max);
        (0..n).map(|_| self.pick(from)).collect()
    }

    /// Up to three ascending cut offsets into `len` bytes.
    pub(crate) fn cuts(&mut self, len: usize) -> Vec<usize> {
        let mut c: Vec<usize> = (0..self.below(4)).map(|_| self.below(len + 1)).collect();
        c.sort_unstable();
        c
    }
}
