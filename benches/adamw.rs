//! CPU throughput of the plain-Rust AdamW reference on one flat f32 tensor, in GB/s of optimizer
//! state traffic (each moment read and written once per step): f32 moments (16 bytes per element)
//! and 8-bit blockwise moments (4 bytes of codes per element plus the block absmax).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qlora::kernels::adamw::{
    reference_step, reference_step_8bit, AdamW8bitState, AdamWConfig, STATE_BLOCK_ELEMS,
};
use qlora::testing::normal_vector;

/// One LoRA r=16 adapter pair of a 4096-wide projection (2 · 16 · 4096 params).
const N: usize = 2 * 16 * 4096;

fn bench_adamw(c: &mut Criterion) {
    let step = AdamWConfig::default()
        .step(10, 1.0)
        .expect("the bench config is valid");
    let grad = normal_vector(N, 1e-3, 2);
    let mut param = normal_vector(N, 0.02, 1);

    let mut group = c.benchmark_group("adamw_f32_states");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Bytes(
            (N * 4 * std::mem::size_of::<f32>()) as u64,
        ));
    let (mut m, mut v) = (vec![0f32; N], vec![0f32; N]);
    group.bench_function("reference", |b| {
        b.iter(|| reference_step(&step, &mut param, &grad, &mut m, &mut v))
    });
    group.finish();

    let mut group = c.benchmark_group("adamw_8bit_states");
    let absmax_bytes = 4 * N.div_ceil(STATE_BLOCK_ELEMS) * std::mem::size_of::<f32>();
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Bytes((N * 4 + absmax_bytes) as u64));
    let mut state = AdamW8bitState::zeros(N);
    group.bench_function("reference", |b| {
        b.iter(|| reference_step_8bit(&step, &mut param, &grad, &mut state))
    });
    group.finish();
}

criterion_group!(benches, bench_adamw);
criterion_main!(benches);
