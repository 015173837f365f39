//! GPU bench of one QLoRA training step at Llama-2-13B layer shapes (hidden 5120, intermediate
//! 13824, 40 heads, vocab 32000) with random NF4 weights: the forward, the explicit backward and a
//! `CudaAdamW` update through `Trainer::train_step`, LoRA r 16 on all seven linears, bf16 compute.
//! Prints tokens/s, step time and peak device memory. Without a GPU it says so and exits 0.
//!
//! Environment: `QLORA_BENCH_LAYERS` (decoder layers, default 2: per-layer time scales linearly, so
//! a 40-layer step takes ≈ 20× the layer part of a 2-layer one), `QLORA_BENCH_SEQ` (tokens per
//! row, default 2048), `QLORA_BENCH_STEPS` (timed steps after one warm-up, default 3).

#[cfg(not(feature = "cuda"))]
fn main() {
    println!(
        "skipping CUDA: train_step_gpu built without the `cuda` feature \
         (cargo bench --features cuda --bench train_step_gpu)"
    );
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = cuda_bench::run() {
        eprintln!("train_step_gpu: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod cuda_bench {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use candle_core::{DType, Device};
    use qlora::kernels::adamw::AdamWConfig;
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::paged::PagingPolicy;
    use qlora::model::llama::{LlamaModel, IGNORE_INDEX};
    use qlora::model::{LlamaConfig, LlamaWeights};
    use qlora::peft::{LoraAdapter, LoraConfig, TargetModule};
    use qlora::train::cuda_adamw::CudaAdamW;
    use qlora::train::data::Batch;
    use qlora::train::schedule::LrSchedule;
    use qlora::train::trainer::{NonFinitePolicy, Trainer, TrainerConfig};
    use qlora::Result;

    fn env_usize(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .unwrap_or(default)
    }

    fn llama2_13b(layers: usize, seq: usize) -> Result<LlamaConfig> {
        LlamaConfig::from_json_str(&format!(
            r#"{{"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
                "num_attention_heads": 40, "num_key_value_heads": 40,
                "num_hidden_layers": {layers}, "vocab_size": 32000,
                "max_position_embeddings": {}, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": false,
                "hidden_act": "silu", "torch_dtype": "bfloat16"}}"#,
            seq.max(4096)
        ))
    }

    /// Device memory in use (total − free), sampled every millisecond on a second thread while
    /// it runs: candle frees buffers as soon as they drop, so a sample after the step would miss
    /// the peak. A sampled maximum is a lower bound on the true peak.
    struct PeakSampler {
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicUsize>,
        handle: Option<std::thread::JoinHandle<()>>,
    }

    impl PeakSampler {
        fn start(dev: &CudaDevice) -> Self {
            let ctx = dev.context().clone();
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicUsize::new(0));
            let (s, p) = (stop.clone(), peak.clone());
            let handle = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Ok((free, total)) = ctx.mem_get_info() {
                        p.fetch_max(total - free, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            PeakSampler {
                stop,
                peak,
                handle: Some(handle),
            }
        }

        fn finish(mut self) -> usize {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
            self.peak.load(Ordering::Relaxed)
        }
    }

    const GIB: f64 = (1u64 << 30) as f64;

    pub fn run() -> Result<()> {
        let layers = env_usize("QLORA_BENCH_LAYERS", 2);
        let seq = env_usize("QLORA_BENCH_SEQ", 2048);
        let steps = env_usize("QLORA_BENCH_STEPS", 3);
        // Parsed before looking for a GPU, so a run without one still checks the config.
        let config = llama2_13b(layers, seq)?;
        let gpu = match CudaDevice::candle_device(0) {
            Ok(d) => d,
            Err(e) => {
                println!("skipping CUDA: {e}");
                return Ok(());
            }
        };
        let dev = CudaDevice::from_candle(&gpu)?;
        println!("{}", dev.describe()?);

        let (free0, total) = dev.memory_info()?;
        let started = Instant::now();
        let weights = LlamaWeights::random(&config, 0.02, 1, DType::BF16, &Device::Cpu)?
            .quantize_linears(64, true)?
            .to_device(&gpu)?;
        let model = LlamaModel::new(config.clone(), weights)?;
        let adapter =
            LoraAdapter::init(LoraConfig::default(), model.config(), DType::F32, &gpu, 2)?;
        if !model.uses_nf4_gemm(0, TargetModule::QProj) {
            return Err(qlora::Error::Cuda(
                "the NF4 linears are not on the dequant-GEMM path".into(),
            ));
        }
        let (free1, _) = dev.memory_info()?;
        println!(
            "Llama-2-13B shapes, {layers} layers, random NF4 weights (blocks of 64, double quant), \
             bf16 compute, LoRA r 16 on all 7 linears; model + adapter {:.2} GiB on the device, \
             made in {:.1} s",
            free0.saturating_sub(free1) as f64 / GIB,
            started.elapsed().as_secs_f64()
        );

        let optimizer = CudaAdamW::new(
            Arc::new(CudaDevice::from_candle(&gpu)?),
            AdamWConfig {
                lr: 2e-4,
                ..AdamWConfig::default()
            },
            PagingPolicy::default(),
        )?;
        let trainer_config = TrainerConfig {
            schedule: LrSchedule::CONSTANT,
            max_grad_norm: Some(0.3),
            non_finite: NonFinitePolicy::Error,
        };
        let mut trainer = Trainer::new(&model, adapter, optimizer, trainer_config)?;
        let input_ids: Vec<u32> = (0..seq).map(|i| ((i * 7919 + 13) % 32000) as u32).collect();
        let mut labels: Vec<i64> = input_ids.iter().map(|&t| t as i64).collect();
        labels[0] = IGNORE_INDEX;
        let batch = Batch {
            batch_size: 1,
            seq_len: seq,
            input_ids,
            labels,
            attention_mask: vec![1; seq],
        };

        // Warm-up: kernel modules load, cuBLAS plans, the optimizer's states are placed.
        let warm = Instant::now();
        trainer.train_step(std::slice::from_ref(&batch))?;
        dev.synchronize()?;
        println!("warm-up step {:.3} s", warm.elapsed().as_secs_f64());

        let sampler = PeakSampler::start(&dev);
        let mut times = Vec::with_capacity(steps);
        let mut last_loss = f32::NAN;
        for _ in 0..steps {
            let t = Instant::now();
            let m = trainer.train_step(std::slice::from_ref(&batch))?;
            dev.synchronize()?;
            times.push(t.elapsed().as_secs_f64());
            last_loss = m.loss;
        }
        let peak = sampler.finish();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "step (forward + explicit backward + CudaAdamW), batch 1 x {seq} tokens: median {:.3} s \
             over {steps} steps (min {:.3}, max {:.3}); {:.0} tokens/s at {layers} layers; loss {last_loss:.4}",
            median,
            times[0],
            times[times.len() - 1],
            seq as f64 / median,
        );
        println!(
            "peak device memory in use (sampled every 1 ms, a lower bound): {:.2} GiB of {:.2} GiB \
             ({:.2} GiB in use before loading)",
            peak as f64 / GIB,
            total as f64 / GIB,
            (total - free0) as f64 / GIB
        );
        Ok(())
    }
}
