//! Randomness of the client role: masking keys (RFC 6455 §5.3) and the handshake's
//! `Sec-WebSocket-Key` nonce (§4.1).
//!
//! RFC 6455 §10.3 asks for masking keys an attacker cannot predict (otherwise a
//! script could make a client write bytes of its choosing through a proxy that does not
//! understand WebSocket). They come from `rand`'s thread-local generator: ChaCha12
//! seeded from the operating system (`getrandom`) and reseeded from it every 64 KiB of
//! output, so a key costs a few nanoseconds, not a system call per frame.

use rand::Rng as _;

/// A fresh, unpredictable 4-byte masking key.
#[inline]
pub fn random_mask() -> [u8; 4] {
    rand::rng().next_u32().to_ne_bytes()
}

/// Fill `buf` with unpredictable bytes.
pub fn fill_random(buf: &mut [u8]) {
    rand::rng().fill_bytes(buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_vary_from_call_to_call() {
        let masks: std::collections::HashSet<[u8; 4]> = (0..1000).map(|_| random_mask()).collect();
        // 1000 draws from 2^32 values: a collision is a one-in-ten-thousand event.
        assert!(masks.len() >= 999);
    }

    #[test]
    fn threads_draw_different_keys() {
        let here: Vec<[u8; 4]> = (0..8).map(|_| random_mask()).collect();
        let there = std::thread::spawn(|| (0..8).map(|_| random_mask()).collect::<Vec<_>>())
            .join()
            .unwrap();
        assert_ne!(here, there);
    }

    #[test]
    fn filled_buffers_differ() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        fill_random(&mut a);
        fill_random(&mut b);
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 16]);
    }
}
