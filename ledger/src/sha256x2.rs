//! Two SHA-256 compressions at once. The state commitment and the block's lists hash tens of
//! thousands of independent 64-byte blocks per block (tree nodes, list nodes, leaves). One
//! compression with the x86 SHA extensions is a chain of dependent `sha256rnds2` instructions,
//! bound by their latency; two independent chains interleaved fill each other's gaps. Measured
//! on this machine's CPU: about 1.4 times the throughput of one at a time (BENCHMARKS.md), and no
//! more with four. Without the SHA extensions (or off x86_64), the two are compressed one after
//! the other by the sha2 crate. Either way the result is exactly SHA-256's compression function.

use sha2::digest::generic_array::GenericArray;

/// One SHA-256 compression of `block` into `state` (the sha2 crate's, which uses the SHA
/// extensions when the CPU has them).
pub fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

/// Compresses `a` into `state_a` and `b` into `state_b`, block by block: the same as
/// [`compress`] over each list in turn. Where one list is longer, its rest is compressed alone.
pub fn compress_x2(state_a: &mut [u32; 8], a: &[[u8; 64]], state_b: &mut [u32; 8], b: &[[u8; 64]]) {
    let both = a.len().min(b.len());
    if both > 0 && has_sha_extensions() {
        for (block_a, block_b) in a[..both].iter().zip(&b[..both]) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has the SHA extensions, SSSE3 and SSE4.1 (checked just above),
            // which is all `x86::compress_x2` is compiled for; it reads exactly its arguments.
            unsafe {
                x86::compress_x2(state_a, block_a, state_b, block_b)
            };
        }
    } else {
        for (block_a, block_b) in a[..both].iter().zip(&b[..both]) {
            compress(state_a, block_a);
            compress(state_b, block_b);
        }
    }
    for block in &a[both..] {
        compress(state_a, block);
    }
    for block in &b[both..] {
        compress(state_b, block);
    }
}

/// Whether the interleaved compression can run here (checked once, then cached by std).
fn has_sha_extensions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// SHA-256's round constants (FIPS 180-4, 4.2.2), four to a vector.
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ];

    /// The state as the SHA instructions hold it: words (a, b, e, f) and (c, d, g, h).
    #[inline(always)]
    unsafe fn load(state: &[u32; 8]) -> (__m128i, __m128i) {
        let words = state.as_ptr().cast::<__m128i>();
        let dcba = _mm_loadu_si128(words);
        let hgfe = _mm_loadu_si128(words.add(1));
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        (_mm_alignr_epi8(cdab, efgh, 8), _mm_blend_epi16(efgh, cdab, 0xF0))
    }

    #[inline(always)]
    unsafe fn store(state: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        let words = state.as_mut_ptr().cast::<__m128i>();
        _mm_storeu_si128(words, _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128(words.add(1), _mm_alignr_epi8(dchg, feba, 8));
    }

    /// The message words of `block`, big-endian, four to a vector.
    #[inline(always)]
    unsafe fn message(block: &[u8; 64]) -> [__m128i; 4] {
        let swap = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0Bu64 as i64, 0x0405_0607_0001_0203u64 as i64);
        let bytes = block.as_ptr().cast::<__m128i>();
        [
            _mm_shuffle_epi8(_mm_loadu_si128(bytes), swap),
            _mm_shuffle_epi8(_mm_loadu_si128(bytes.add(1)), swap),
            _mm_shuffle_epi8(_mm_loadu_si128(bytes.add(2)), swap),
            _mm_shuffle_epi8(_mm_loadu_si128(bytes.add(3)), swap),
        ]
    }

    /// One compression of `a` into `state_a` and one of `b` into `state_b`, their instructions
    /// interleaved: the sha2 crate's SHA-extension rounds, twice over.
    ///
    /// # Safety
    /// The CPU must have the SHA extensions, SSSE3 and SSE4.1.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn compress_x2(state_a: &mut [u32; 8], a: &[u8; 64], state_b: &mut [u32; 8], b: &[u8; 64]) {
        let (mut abef_a, mut cdgh_a) = load(state_a);
        let (mut abef_b, mut cdgh_b) = load(state_b);
        let (start_abef_a, start_cdgh_a, start_abef_b, start_cdgh_b) = (abef_a, cdgh_a, abef_b, cdgh_b);
        let [mut a0, mut a1, mut a2, mut a3] = message(a);
        let [mut b0, mut b1, mut b2, mut b3] = message(b);
        let constants = K.as_ptr().cast::<__m128i>();
        // Four rounds of each, with message words `wa` and `wb` and constants `i`.
        macro_rules! rounds4 {
            ($wa:ident, $wb:ident, $i:expr) => {{
                let k = _mm_loadu_si128(constants.add($i));
                let ta = _mm_add_epi32($wa, k);
                let tb = _mm_add_epi32($wb, k);
                cdgh_a = _mm_sha256rnds2_epu32(cdgh_a, abef_a, ta);
                cdgh_b = _mm_sha256rnds2_epu32(cdgh_b, abef_b, tb);
                abef_a = _mm_sha256rnds2_epu32(abef_a, cdgh_a, _mm_shuffle_epi32(ta, 0x0E));
                abef_b = _mm_sha256rnds2_epu32(abef_b, cdgh_b, _mm_shuffle_epi32(tb, 0x0E));
            }};
        }
        // The next four message words of each into `w0` (from `w0..w3`), then their rounds.
        macro_rules! schedule_rounds4 {
            ($a0:ident, $a1:ident, $a2:ident, $a3:ident, $b0:ident, $b1:ident, $b2:ident, $b3:ident, $i:expr) => {{
                let ta = _mm_add_epi32(_mm_sha256msg1_epu32($a0, $a1), _mm_alignr_epi8($a3, $a2, 4));
                let tb = _mm_add_epi32(_mm_sha256msg1_epu32($b0, $b1), _mm_alignr_epi8($b3, $b2, 4));
                $a0 = _mm_sha256msg2_epu32(ta, $a3);
                $b0 = _mm_sha256msg2_epu32(tb, $b3);
                rounds4!($a0, $b0, $i);
            }};
        }
        rounds4!(a0, b0, 0);
        rounds4!(a1, b1, 1);
        rounds4!(a2, b2, 2);
        rounds4!(a3, b3, 3);
        schedule_rounds4!(a0, a1, a2, a3, b0, b1, b2, b3, 4);
        schedule_rounds4!(a1, a2, a3, a0, b1, b2, b3, b0, 5);
        schedule_rounds4!(a2, a3, a0, a1, b2, b3, b0, b1, 6);
        schedule_rounds4!(a3, a0, a1, a2, b3, b0, b1, b2, 7);
        schedule_rounds4!(a0, a1, a2, a3, b0, b1, b2, b3, 8);
        schedule_rounds4!(a1, a2, a3, a0, b1, b2, b3, b0, 9);
        schedule_rounds4!(a2, a3, a0, a1, b2, b3, b0, b1, 10);
        schedule_rounds4!(a3, a0, a1, a2, b3, b0, b1, b2, 11);
        schedule_rounds4!(a0, a1, a2, a3, b0, b1, b2, b3, 12);
        schedule_rounds4!(a1, a2, a3, a0, b1, b2, b3, b0, 13);
        schedule_rounds4!(a2, a3, a0, a1, b2, b3, b0, b1, 14);
        schedule_rounds4!(a3, a0, a1, a2, b3, b0, b1, b2, 15);
        store(
            state_a,
            _mm_add_epi32(abef_a, start_abef_a),
            _mm_add_epi32(cdgh_a, start_cdgh_a),
        );
        store(
            state_b,
            _mm_add_epi32(abef_b, start_abef_b),
            _mm_add_epi32(cdgh_b, start_cdgh_b),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(seed: u8, count: usize) -> Vec<[u8; 64]> {
        (0..count)
            .map(|i| std::array::from_fn(|j| seed.wrapping_mul(31).wrapping_add((i * 64 + j) as u8 ^ 0x5a)))
            .collect()
    }

    /// Two interleaved compressions are the two compressions, from any states, for lists of any
    /// lengths (the longer one's rest compressed alone).
    #[test]
    fn two_at_once_are_the_two_one_after_the_other() {
        for seed in 0..40u8 {
            for (count_a, count_b) in [(1, 1), (3, 3), (2, 5), (4, 0), (0, 2), (0, 0)] {
                let (a, b) = (blocks(seed, count_a), blocks(seed ^ 0xff, count_b));
                let start_a: [u32; 8] = std::array::from_fn(|i| u32::from(seed) * 0x0101_0101 + i as u32);
                let start_b: [u32; 8] = std::array::from_fn(|i| !(u32::from(seed) << 8) ^ i as u32);
                let (mut one_a, mut one_b) = (start_a, start_b);
                for block in &a {
                    compress(&mut one_a, block);
                }
                for block in &b {
                    compress(&mut one_b, block);
                }
                let (mut two_a, mut two_b) = (start_a, start_b);
                compress_x2(&mut two_a, &a, &mut two_b, &b);
                assert_eq!(
                    (two_a, two_b),
                    (one_a, one_b),
                    "seed {seed}, {count_a} and {count_b} blocks"
                );
            }
        }
    }

    /// The interleaved compression is SHA-256's: one padded block from the initial state is the
    /// digest of the empty string, and of "abc" (FIPS 180-4's example).
    #[test]
    fn two_at_once_give_the_standard_digests() {
        let initial = [
            0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
        ];
        let mut empty = [0u8; 64];
        empty[0] = 0x80;
        let mut abc = [0u8; 64];
        abc[..4].copy_from_slice(b"abc\x80");
        abc[63] = 24;
        let (mut state_empty, mut state_abc) = (initial, initial);
        compress_x2(&mut state_empty, &[empty], &mut state_abc, &[abc]);
        let hex = |state: [u32; 8]| state.iter().map(|w| format!("{w:08x}")).collect::<String>();
        assert_eq!(
            hex(state_empty),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(state_abc),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
