//! Ones' complement arithmetic for incremental checksum updates (RFC 1624), shared by the
//! datapath's XDP rewrites and tested here on the host.
//!
//! Words are taken as they are in memory (`from_ne_bytes` of the wire bytes), and so is the
//! 16-bit checksum field: the ones' complement sum does not depend on byte order (RFC 1071,
//! 2(B)), so no byte swapping is needed anywhere.

/// The ones' complement sum of `new` minus `old`: each old word's complement plus each new word
/// (RFC 1624, eqn. 3), in 32-bit ones' complement, which folds to the same 16-bit sum.
#[inline(always)]
#[must_use]
pub fn diff<const N: usize>(old: &[u32; N], new: &[u32; N]) -> u32 {
    let mut s = 0u64;
    for i in 0..N {
        s += u64::from(!old[i]) + u64::from(new[i]);
    }
    // N is at most a few words: two folds bring any such sum to 32 bits.
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 32 bits above")]
    let folded = s as u32;
    folded
}

/// The sum of two differences (see `diff`), as one: 32-bit ones' complement addition (the
/// carry wraps around). For an IPv6 address pair, two four-word differences added cost no
/// eight-word array on the stack.
#[inline(always)]
#[must_use]
pub fn add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s + u32::from(carry)
}

/// The new value of a 16-bit checksum field `field` after changes whose differences (see
/// `diff`) are `a` and `b`.
#[inline(always)]
#[must_use]
pub fn apply(field: u16, a: u32, b: u32) -> u16 {
    let mut s = u64::from(!field) + u64::from(a) + u64::from(b);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = s as u16;
    !folded
}

/// The checksum field value for `sum`, the ones' complement sum (32-bit, unfolded) of the bytes
/// it covers with the field itself zero.
#[inline(always)]
#[must_use]
pub fn fold_complement(sum: u32) -> u16 {
    apply(0xffff, sum, 0)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::{apply, diff, fold_complement};

    /// xorshift64: deterministic, no dependency. Every few draws an extreme word (0, all ones),
    /// where ones' complement arithmetic has its corner cases.
    struct Rng(u64);

    impl Rng {
        fn word(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            #[expect(clippy::cast_possible_truncation, reason = "low 32 bits")]
            match self.0 % 8 {
                0 => 0,
                1 => u32::MAX,
                _ => (self.0 >> 16) as u32,
            }
        }
    }

    /// The 16-bit ones' complement sum of `bytes` (whole 16-bit words), in memory order.
    fn sum(bytes: &[u8]) -> u16 {
        let mut s: u64 = bytes.chunks(2).map(|c| u64::from(u16::from_ne_bytes([c[0], c[1]]))).sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        u16::try_from(s).expect("folded")
    }

    fn words(bytes: &[u8]) -> Vec<u32> {
        bytes.chunks(4).map(|c| u32::from_ne_bytes(c.try_into().expect("4 bytes"))).collect()
    }

    /// 24 bytes (six words) with a checksum over them all at bytes 10..12, from scratch. The
    /// first byte is an IPv4 header's (0x45): data that a checksum covers is never all zero
    /// (for TCP and UDP the pseudo header holds the protocol), the one case where an
    /// incremental update gives the other zero (0x0000 for 0xffff, RFC 1624 section 3).
    fn covered(rng: &mut Rng) -> [u8; 24] {
        let mut h = [0u8; 24];
        for c in h.chunks_mut(4) {
            c.copy_from_slice(&rng.word().to_ne_bytes());
        }
        h[0] = 0x45;
        h[10..12].fill(0);
        let field = fold_complement(u32::from(sum(&h)));
        h[10..12].copy_from_slice(&field.to_ne_bytes());
        h
    }

    /// Valid: the sum over the bytes, the checksum included, is all ones (either zero).
    fn valid(bytes: &[u8]) -> bool {
        sum(bytes) == 0xffff
    }

    #[test]
    fn from_scratch_checksums_are_valid() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..10_000 {
            assert!(valid(&covered(&mut rng)));
        }
    }

    /// As the datapath rewrites a tuple: words 3 and 4 (the addresses) change with one
    /// difference, word 5 (the ports) with another, and the checksum takes both.
    #[test]
    fn incremental_updates_keep_checksums_valid() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..100_000 {
            let mut h = covered(&mut rng);
            let old = words(&h);
            let new = [rng.word(), rng.word(), rng.word()];
            let addrs = diff(&[old[3], old[4]], &[new[0], new[1]]);
            let ports = diff(&[old[5]], &[new[2]]);
            for (i, w) in new.iter().enumerate() {
                h[12 + 4 * i..16 + 4 * i].copy_from_slice(&w.to_ne_bytes());
            }
            let field = u16::from_ne_bytes([h[10], h[11]]);
            h[10..12].copy_from_slice(&apply(field, addrs, ports).to_ne_bytes());
            assert!(valid(&h), "{old:08x?} -> {new:08x?}: {h:02x?}");
        }
    }

    /// Two differences added equal the difference over both words sets at once.
    #[test]
    fn added_differences_equal_one_difference() {
        let mut rng = Rng(11);
        for _ in 0..100_000 {
            let old: [u32; 8] = core::array::from_fn(|_| rng.word());
            let new: [u32; 8] = core::array::from_fn(|_| rng.word());
            let half = |w: &[u32; 8], i: usize| -> [u32; 4] { core::array::from_fn(|j| w[4 * i + j]) };
            let split = super::add(diff(&half(&old, 0), &half(&new, 0)), diff(&half(&old, 1), &half(&new, 1)));
            let field = fold_complement(rng.word());
            assert_eq!(apply(field, split, 0), apply(field, diff(&old, &new), 0), "{old:x?} -> {new:x?}");
        }
    }

    #[test]
    fn differences_of_many_words_fold() {
        let mut rng = Rng(7);
        for _ in 0..10_000 {
            let old: [u32; 7] = core::array::from_fn(|_| rng.word());
            let new: [u32; 7] = core::array::from_fn(|_| rng.word());
            let bytes = |w: &[u32; 7]| w.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
            let (old_bytes, new_bytes) = (bytes(&old), bytes(&new));
            // A checksum over `old` then updated to `new` equals one computed over `new`.
            let before = fold_complement(u32::from(sum(&old_bytes)));
            let after = apply(before, diff(&old, &new), 0);
            let mut check = new_bytes.clone();
            check.extend_from_slice(&after.to_ne_bytes());
            assert!(valid(&check), "{old:x?} -> {new:x?}");
        }
    }
}
