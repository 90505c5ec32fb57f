//! Counter-based uniform draws.
//!
//! The draw for a row depends only on (seed, row key, position), so a token does not
//! change with batch composition, row order or thread count. Three rounds of the
//! SplitMix64 finaliser over the key chain are plenty for sampling and cheap to mirror
//! in numpy (`reference.py` does the same arithmetic on uint64).

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// Salt of the second stream at a position (acceptance tests of drafted tokens).
const ACCEPT_SALT: u64 = 0x6163_6365_7074_2121;

fn key_hash(seed: u64, row_key: u64, position: u64) -> u64 {
    mix64(mix64(mix64(seed) ^ row_key) ^ position)
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform draw in [0, 1) with 53 random bits.
pub fn uniform(seed: u64, row_key: u64, position: u64) -> f64 {
    unit(key_hash(seed, row_key, position))
}

/// A second uniform at the same key, independent of `uniform`: the acceptance test of a
/// drafted token. A position is decided once, so each of its two draws is used once.
pub fn accept_uniform(seed: u64, row_key: u64, position: u64) -> f64 {
    unit(mix64(key_hash(seed, row_key, position) ^ ACCEPT_SALT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_unit_interval_and_keyed() {
        let mut sum = 0.0;
        for p in 0..10_000u64 {
            let u = uniform(7, 3, p);
            assert!((0.0..1.0).contains(&u));
            sum += u;
        }
        assert!((sum / 10_000.0 - 0.5).abs() < 0.02);
        assert_eq!(uniform(1, 2, 3), uniform(1, 2, 3));
        assert_ne!(uniform(1, 2, 3), uniform(1, 3, 2));
        assert_ne!(uniform(1, 2, 3), uniform(2, 2, 3));
        assert_ne!(uniform(1, 2, 3), accept_uniform(1, 2, 3));
    }
}
