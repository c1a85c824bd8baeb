//! `rdrop eval`: top-1 / top-5 accuracy and mean cross-entropy of a ViT on a dataset's test
//! split, with the R-Drop recipe's test transform (Resize((S, S)) bilinear → ToTensor →
//! Normalize(0.5, 0.5); arXiv 2106.14448, `vit_src/utils/data_utils.py`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use rdrop_data::{Loader, LoaderConfig};
use rdrop_vit::{load_model, HeadStatus, LoadOptions};

use crate::device::ComputeArgs;
use crate::evaluate::Accumulator;
use crate::learner::Predictor;
use crate::world::{self, Role, World};

/// Evaluate weights on the test split of a CIFAR dataset.
///
/// WEIGHTS may be a Hugging Face model folder or hub repo id (e.g.
/// google/vit-base-patch16-224-in21k; cached in the standard HF cache, HF_HUB_OFFLINE=1 for
/// cache only), a timm .safetensors file, Google's original .npz, or a checkpoint / run
/// folder written by `rdrop train` (final/, else best/, else the newest checkpoint).
/// The classifier must have been trained for this dataset's classes: a new (zero) head is
/// refused.
///
/// Data parallel: `--nproc-per-node N` (or started by torchrun / srun) splits the test batches
/// over the ranks, one GPU each, and sums their counts; rank 0 prints the result.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Weights: HF folder / hub repo id / timm .safetensors / Google .npz / run or checkpoint folder.
    #[arg(long, value_name = "SPEC")]
    pub weights: String,
    /// Dataset: cifar-100-python.tar.gz / cifar-10-python.tar.gz, an extracted folder, or
    /// builtin:digits (the demo's embedded digits, as `rdrop train` takes it).
    #[arg(long, value_name = "PATH")]
    pub data: String,
    /// Input size S (default: the checkpoint's); position embeddings are resized if it differs.
    #[arg(long, value_name = "S")]
    pub image_size: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, value_name = "B")]
    pub batch_size: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Architecture preset for files without a config (timm, npz): vit-ti16, vit-s16, vit-b16,
    /// vit-b32, vit-l16, cpu-small, tiny. Default: inferred from the tensor shapes.
    #[arg(long, value_name = "PRESET")]
    pub model: Option<String>,
    /// Attention heads, for files without a config (timm) whose shapes match no preset.
    #[arg(long, value_name = "H")]
    pub num_heads: Option<usize>,
    /// LayerNorm epsilon (default: the weights' config.json, else 1e-6).
    #[arg(long, value_name = "EPS")]
    pub layer_norm_eps: Option<f64>,
    /// Evaluate only the first N test images.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print one JSON object {"top1", "top5", "loss", "n"} (fractions in [0, 1]) and nothing else on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write every test image's logits, in file order, to FILE as an f32 `.npy` (N × classes).
    /// For comparing devices and precisions (scripts/gpu-check.sh).
    #[arg(long, value_name = "FILE", hide = true)]
    pub dump_logits: Option<PathBuf>,
    /// Start N ranks on this node, one per GPU (cuda:0..N-1), each evaluating a contiguous
    /// share of the test batches; their counts are summed. Not needed under torchrun or srun.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let spec = match world::role(args.nproc_per_node)? {
        Role::Launch(n) => {
            world::check_ranks(args.compute.device, n, n, true)?;
            anyhow::ensure!(
                args.dump_logits.is_none(),
                "--dump-logits writes every image's logits from one process: drop --nproc-per-node"
            );
            return crate::launch::launch(n, &[]);
        }
        Role::Rank(spec) => spec,
    };
    world::check_ranks(
        args.compute.device,
        spec.world_size,
        spec.local_world_size,
        true,
    )?;
    anyhow::ensure!(
        args.dump_logits.is_none() || spec.world_size == 1,
        "--dump-logits writes every image's logits from one process: run it without ranks"
    );
    let on = world::rank_device(args.compute.device, &spec);
    let world = World::join_on(spec, on)?;
    let compute = ComputeArgs {
        device: on,
        ..args.compute.clone()
    };
    let res = evaluate(&args, &compute, &world);
    match res {
        Ok(()) => world.finish(),
        // Leaving without a goodbye: the other ranks stop, naming this one.
        Err(e) => Err(e),
    }
}

fn evaluate(args: &Args, compute: &ComputeArgs, world: &World) -> anyhow::Result<()> {
    let lead = world.is_lead();
    let device = compute.open()?;
    let data = crate::setup::open_data(&args.data)?;
    let classes = data.num_classes();
    let opts = LoadOptions {
        preset: args.model.clone(),
        num_heads: args.num_heads,
        num_classes: Some(classes),
        image_size: args.image_size,
        layer_norm_eps: args.layer_norm_eps,
        device: device.clone(),
        ..Default::default()
    };
    // One download into the shared cache; the other ranks then read it.
    if lead {
        crate::hub::prefetch(&args.weights)?;
    }
    world.barrier()?;
    let mut loaded = load_model(&args.weights, &opts)
        .with_context(|| format!("loading weights `{}`", args.weights))?;
    if !args.json && lead {
        eprint!("{}", loaded.report);
        if world.collective().is_some() {
            eprintln!(
                "data parallel: {}; each rank evaluates its share of the test batches",
                world.describe()
            );
        }
    }
    if let HeadStatus::New(why) = &loaded.report.head {
        anyhow::bail!(
            "refusing to evaluate `{}`: its classifier is new and zero ({why}), so every image would get \
             the same scores (chance accuracy). Evaluate weights fine-tuned on this dataset's {classes} \
             classes (e.g. a run folder of `rdrop train`).",
            args.weights
        );
    }
    if loaded.model.head_is_zero()? {
        anyhow::bail!(
            "refusing to evaluate `{}`: its classifier weights are all zero (an untrained head gives \
             chance accuracy). Fine-tune it first with `rdrop train`.",
            args.weights
        );
    }
    loaded.model.set_compute_dtype(compute.precision.dtype())?;
    let size = loaded.config.image_size;
    let mut model = Predictor::new(loaded.model, compute.explicit()?)?;
    let mut split = data.test;
    if let Some(n) = args.limit {
        anyhow::ensure!(n > 0, "--limit must be at least 1");
        crate::setup::keep_first(&mut split, n);
    }
    let total = split.len();
    let loader = Loader::new(Arc::new(split), LoaderConfig::test(size, args.batch_size))
        .context("building the test loader")?;
    // This rank's contiguous share of the batches (all of them for one process).
    let mine = rdrop_core::dist::shard(loader.batches_per_epoch(), world.size(), world.rank());
    let pb = if args.json || !lead {
        ProgressBar::hidden()
    } else if world.size() > 1 {
        // Rank 0's share.
        ProgressBar::new((mine.len() * args.batch_size).min(total) as u64)
    } else {
        ProgressBar::new(total as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("eval {bar:30} {pos}/{len} images  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = std::time::Instant::now();
    let mut acc = Accumulator::default();
    let (mut dumped, mut dumped_rows) = (Vec::<f32>::new(), 0usize);
    for batch in loader.epoch(0, mine.start).take(mine.len()) {
        let batch = batch.context("reading a test batch")?;
        let (x, _) = batch.to_tensors(DType::F32, &device)?;
        let logits = model.logits(&x)?.to_vec2::<f32>()?;
        acc.add(&logits, &batch.labels)?;
        if args.dump_logits.is_some() {
            dumped.extend(logits.iter().flatten());
            dumped_rows += logits.len();
        }
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    acc.reduce(world)?;
    let r = acc.result();
    if !lead {
        return Ok(());
    }
    if let Some(path) = &args.dump_logits {
        let cols = dumped.len() / dumped_rows.max(1);
        candle_core::Tensor::from_vec(dumped, (dumped_rows, cols), &candle_core::Device::Cpu)
            .and_then(|t| t.write_npy(path))
            .with_context(|| format!("writing logits to {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let secs = start.elapsed().as_secs_f64();
        println!(
            "top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  n {}  ({:.1} images/s)",
            100.0 * r.top1,
            100.0 * r.top5,
            r.loss,
            r.n,
            r.n as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
