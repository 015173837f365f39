//! CPU throughput of the plain-Rust NF4 reference on one 4096×4096 weight (blocks of 64):
//! quantize (bytes of f32 input read) and dequantize (bytes of f32 output written), with f32
//! absmax and with double-quantized absmax. Model loading runs these paths.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qlora::quant::nf4::Nf4Tensor;

const ROWS: usize = 4096;
const COLS: usize = 4096;
const BLOCKSIZE: usize = 64;

fn bench_nf4(c: &mut Criterion) {
    let data = qlora::testing::normal_vector(ROWS * COLS, 0.02, 1);
    let bytes = (data.len() * std::mem::size_of::<f32>()) as u64;
    let mut group = c.benchmark_group("nf4_4096x4096");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(bytes));
    for (label, double_quant) in [("f32_absmax", false), ("double_quant", true)] {
        group.bench_function(BenchmarkId::new("quantize", label), |b| {
            b.iter(|| Nf4Tensor::quantize(&data, &[ROWS, COLS], BLOCKSIZE, double_quant))
        });
        let t = Nf4Tensor::quantize(&data, &[ROWS, COLS], BLOCKSIZE, double_quant)
            .expect("the bench input is valid");
        let mut out = vec![0f32; ROWS * COLS];
        group.bench_function(BenchmarkId::new("dequantize", label), |b| {
            b.iter(|| t.dequantize_into(&mut out))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_nf4);
criterion_main!(benches);
