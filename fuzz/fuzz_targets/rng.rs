//! xorshift64*: cheap, deterministic choices (chunk sizes, cut points, masks)
//! derived from a seed taken from the fuzz input.

pub struct Rng(u64);

impl Rng {
    /// A generator seeded from 8 input bytes (a zero seed is made odd).
    pub fn new(seed: &[u8]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&seed[..8]);
        Rng(u64::from_le_bytes(s) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
