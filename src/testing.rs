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
