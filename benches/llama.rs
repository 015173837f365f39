//! CPU throughput of the plain-Rust Llama hot-op references (kernels/llama.cu's oracles) at a
//! Llama-2-7B layer's shapes for 512 tokens, in GB/s of f32 read + written: RMSNorm forward and
//! backward over [512, 4096], RoPE on q/k [512, 32, 128], SwiGLU forward and backward on [512, 11008].

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qlora::kernels::llama::*;
use qlora::testing::normal_vector;

const TOKENS: usize = 512;
const HIDDEN: usize = 4096;
const HEADS: usize = 32;
const HEAD_DIM: usize = 128;
const INTERMEDIATE: usize = 11008;

fn bytes(f32s: usize) -> Throughput {
    Throughput::Bytes((f32s * std::mem::size_of::<f32>()) as u64)
}

fn bench_llama(c: &mut Criterion) {
    let mut group = c.benchmark_group("llama_ref");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));

    let n = TOKENS * HIDDEN;
    let x = normal_vector(n, 1.0, 1);
    let dy = normal_vector(n, 1.0, 2);
    let w = normal_vector(HIDDEN, 1.0, 3);
    let (_, rstd) = rmsnorm_forward_ref(&x, &w, HIDDEN, 1e-5).expect("valid bench shape");
    group.throughput(bytes(2 * n + HIDDEN));
    group.bench_function("rmsnorm_forward", |b| {
        b.iter(|| rmsnorm_forward_ref(&x, &w, HIDDEN, 1e-5))
    });
    group.throughput(bytes(3 * n + 2 * HIDDEN));
    group.bench_function("rmsnorm_backward", |b| {
        b.iter(|| rmsnorm_backward_ref(&dy, &x, &w, &rstd, HIDDEN))
    });

    let half = HEAD_DIM / 2;
    let positions: Vec<i32> = (0..TOKENS as i32).collect();
    let angles: Vec<f32> = (0..TOKENS * half)
        .map(|i| (i / half) as f32 * 10000f32.powf(-2.0 * (i % half) as f32 / HEAD_DIM as f32))
        .collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let q = normal_vector(TOKENS * HEADS * HEAD_DIM, 1.0, 4);
    let k = normal_vector(TOKENS * HEADS * HEAD_DIM, 1.0, 5);
    group.throughput(bytes(2 * (q.len() + k.len())));
    group.bench_function("rope", |b| {
        b.iter(|| {
            rope_ref(
                &q, &k, &cos, &sin, &positions, HEADS, HEADS, HEAD_DIM, false,
            )
        })
    });

    let m = TOKENS * INTERMEDIATE;
    let g = normal_vector(m, 3.0, 6);
    let u = normal_vector(m, 1.0, 7);
    let dh = normal_vector(m, 1.0, 8);
    group.throughput(bytes(3 * m));
    group.bench_function("swiglu_forward", |b| b.iter(|| swiglu_forward_ref(&g, &u)));
    group.throughput(bytes(5 * m));
    group.bench_function("swiglu_backward", |b| {
        b.iter(|| swiglu_backward_ref(&g, &u, &dh))
    });
    group.finish();
}

criterion_group!(benches, bench_llama);
criterion_main!(benches);
