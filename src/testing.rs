//! Deterministic test inputs shared by tests, benches and the demo: weight-like values with the
//! awkward cases quantizers get wrong (zeros, all-zero blocks, outliers, subnormals, one-signed
//! blocks, exact NF4 code values and the midpoints between them).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Approximately normal values (sum of uniforms), scaled like a linear layer's weights.
pub fn normal_vector(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
            // The variance of a sum of 4 uniforms is 1/3.
            s * std * 3f32.sqrt()
        })
        .collect()
}

/// [`normal_vector`] with special values planted at fixed, seed-dependent places.
pub fn quantizer_stress_vector(n: usize, seed: u64) -> Vec<f32> {
    let mut v = normal_vector(n, 0.02, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let code = crate::quant::nf4::NF4_CODE;
    for (i, x) in v.iter_mut().enumerate() {
        match rng.random_range(0..64u32) {
            0 => *x = 0.0,
            1 => *x = if rng.random::<bool>() { 3.5 } else { -7.25 },
            2 => *x = f32::from_bits(rng.random_range(1..0x0080_0000u32)),
            3 => *x = code[i % 16] * 0.05,
            4 => *x = 0.5 * (code[i % 15] + code[i % 15 + 1]) * 0.05,
            _ => {}
        }
    }
    // One all-zero block and one negative-only block where the length allows.
    if n >= 192 {
        v[64..128].fill(0.0);
        for x in &mut v[128..192] {
            *x = -x.abs();
        }
    }
    v
}

/// A counting global allocator for tests that measure memory (`tests/plan.rs` against the memory
/// plan, `tests/fuzz_loaders.rs` bounding what a damaged file may make a loader allocate). A test
/// binary installs it with `#[global_allocator] static A: CountingAllocator = CountingAllocator;`.
/// A tensor's values as host f32, whatever its device and dtype (flattened, row-major): how the
/// tests compare tensors.
pub fn values(t: &candle_core::Tensor) -> Vec<f32> {
    let host = t
        .to_device(&candle_core::Device::Cpu)
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>());
    host.unwrap_or_else(|e| panic!("tensor values: {e}"))
}

pub mod alloc {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicIsize, Ordering};

    /// Counts the bytes a measuring thread requests from the system allocator that are live, and
    /// their peak. Only threads inside [`Tracked`] count, so the test harness and other threads
    /// (output capture, a finished test's thread-local teardown) never disturb a measurement.
    pub struct CountingAllocator;

    static LIVE: AtomicIsize = AtomicIsize::new(0);
    static PEAK: AtomicIsize = AtomicIsize::new(0);

    thread_local! {
        static TRACKED: Cell<bool> = const { Cell::new(false) };
    }

    fn tracked() -> bool {
        TRACKED.try_with(Cell::get).unwrap_or(false)
    }

    fn grew(bytes: usize) {
        if tracked() {
            let live = LIVE.fetch_add(bytes as isize, Ordering::SeqCst) + bytes as isize;
            PEAK.fetch_max(live, Ordering::SeqCst);
        }
    }

    fn shrank(bytes: usize) {
        if tracked() {
            LIVE.fetch_sub(bytes as isize, Ordering::SeqCst);
        }
    }

    // SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged,
    // so the GlobalAlloc contract is System's; the counters only observe sizes and never
    // allocate.
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller upholds `alloc`'s contract (non-zero size), which we pass on.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: as `alloc`.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from this allocator (hence System) with `layout`, per the caller.
            unsafe { System.dealloc(ptr, layout) };
            shrank(layout.size());
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: `ptr` and `layout` came from this allocator, per the caller.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                shrank(layout.size());
                grew(new_size);
            }
            p
        }
    }

    /// Counts this thread's allocations while alive.
    pub struct Tracked;

    impl Tracked {
        pub fn start() -> Self {
            TRACKED.with(|t| t.set(true));
            Tracked
        }
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            TRACKED.with(|t| t.set(false));
        }
    }

    /// The bytes the tracked threads hold now.
    pub fn live() -> isize {
        LIVE.load(Ordering::SeqCst)
    }

    /// Restarts the peak at the current live bytes.
    pub fn reset_peak() {
        PEAK.store(live(), Ordering::SeqCst);
    }

    /// The most the tracked threads held since the last [`reset_peak`].
    pub fn peak() -> isize {
        PEAK.load(Ordering::SeqCst)
    }
}
