//! Running a kernel compiled for the best instruction set the CPU offers.
//!
//! Design notes. Wheels target baseline x86-64 (SSE2), where the exp loops stay scalar;
//! with AVX2 they run 4 lanes wide (measured 2.1 → 1.3 ns per exp, and more once sums
//! fuse). Each hot kernel has a twin marked `#[target_feature(enable = "avx2,fma")]`
//! that calls the `#[inline(always)]` generic version, so the whole row pipeline is
//! compiled again for AVX2. It has to be a named function: a closure passed through a
//! generic target-feature function was measured to stay baseline (and slower).
//! Floating-point results do not change: Rust never contracts a multiply and an add into
//! an FMA on its own, and the lane layout of every sum is fixed in the source.
use std::sync::OnceLock;

/// Whether the AVX2 twins may run: the CPU has AVX2 and FMA, and the environment does
/// not set `DUALSAMPLE_NO_SIMD` (which tests use to check that both builds agree).
#[inline]
pub fn has_avx2_fma() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let disabled = std::env::var_os("DUALSAMPLE_NO_SIMD").is_some_and(|v| !v.is_empty() && v != "0");
        #[cfg(target_arch = "x86_64")]
        {
            !disabled && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = disabled;
            false
        }
    })
}

/// Define `$fast`, an AVX2+FMA build of the `#[inline(always)]` function `$generic`,
/// and `$best`, which calls whichever suits this CPU.
macro_rules! with_avx2_twin {
    ($best:ident, $fast:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $fast($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }

        fn $best($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if $crate::kernels::simd::has_avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { $fast($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use with_avx2_twin;
