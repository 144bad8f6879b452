//! `vipllava bench --image ... --devices ... --dtypes ...`: the backend comparison. Each
//! combination runs in a child process (so its peak memory is its own) that prints one
//! JSON result and writes its logits; the parent compares the logits with cpu/f32.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::Args;

use vipllava::Quantization;
use vipllava::compare::{ComboResult, ComboSpec, render_table, run_combo};

use vipllava::model::Precision;

/// Backend-comparison options of `bench`.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct CompareArgs {
    /// Question asked about the image in a backend comparison.
    #[arg(
        long,
        default_value = "What is shown in the image? Describe the main object and its surroundings."
    )]
    pub question: String,
    /// Backend comparison on --image with the real pipeline: devices to compare (see
    /// --device of `generate`). Giving --devices or --dtypes selects this mode.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Dtypes to compare (default f32).
    #[arg(long, value_delimiter = ',')]
    pub dtypes: Vec<Precision>,
    /// In a backend comparison, also run each device/dtype with these weight
    /// quantizations (q8, q4); without --devices/--dtypes, quantize the weights of the
    /// batch-size benchmark (one level).
    #[arg(long, value_delimiter = ',')]
    pub quantize: Vec<Quantization>,
    /// Internal: run one combination in this process and write its logits here.
    #[arg(long, hide = true)]
    pub child_logits: Option<PathBuf>,
}

impl CompareArgs {
    /// Whether a backend comparison was asked for.
    pub fn requested(&self) -> bool {
        !self.devices.is_empty() || !self.dtypes.is_empty()
    }
}

/// Runs the comparison (or, with `--child-logits`, one combination of it).
pub(crate) fn run(
    model: &Path,
    image: Option<&Path>,
    args: &CompareArgs,
    repeats: usize,
    new_tokens: usize,
    json: bool,
) -> anyhow::Result<()> {
    let image_path = image.context("a backend comparison needs --image")?;
    anyhow::ensure!(repeats > 0, "--repeats must be at least 1");
    let devices = if args.devices.is_empty() {
        vec!["cpu".to_string()]
    } else {
        args.devices.clone()
    };
    let dtypes = if args.dtypes.is_empty() {
        vec![Precision::F32]
    } else {
        args.dtypes.clone()
    };
    if let Some(logits_path) = &args.child_logits {
        let image = super::load_image(image_path)?;
        let spec = ComboSpec {
            device: devices[0].clone(),
            dtype: dtypes[0],
            quantize: args.quantize.first().copied(),
        };
        let (result, logits) = run_combo(model, &image, &args.question, &spec, repeats, new_tokens)?;
        super::write_npy(logits_path, &[logits.len() as u64], &logits)?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }

    let mut combos: Vec<(String, Precision, Option<Quantization>)> = Vec::new();
    for device in &devices {
        device.parse::<vipllava::DeviceSpec>()?;
        for &dtype in &dtypes {
            combos.push((device.clone(), dtype, None));
            for &q in &args.quantize {
                combos.push((device.clone(), dtype, Some(q)));
            }
        }
    }
    // The reference every logit is compared with.
    let reference = ("cpu".to_string(), Precision::F32, None);
    if !combos.contains(&reference) {
        combos.insert(0, reference.clone());
    }

    let scratch = tempfile_dir()?;
    let mut results: Vec<(ComboResult, Vec<f32>)> = Vec::new();
    for (n, (device, dtype, quantize)) in combos.iter().enumerate() {
        let logits_path = scratch.join(format!("logits-{n}.npy"));
        let exe = std::env::current_exe().context("locating the vipllava binary")?;
        let mut command = Command::new(exe);
        command
            .arg("bench")
            .arg("--model")
            .arg(model)
            .arg("--image")
            .arg(image_path)
            .arg("--question")
            .arg(&args.question)
            .arg("--devices")
            .arg(device)
            .arg("--dtypes")
            .arg(dtype.to_string())
            .arg("--repeats")
            .arg(repeats.to_string())
            .arg("--new-tokens")
            .arg(new_tokens.to_string())
            .arg("--child-logits")
            .arg(&logits_path);
        if let Some(q) = quantize {
            command.arg("--quantize").arg(q.to_string());
        }
        eprintln!(
            "running {device} {dtype}{} ...",
            quantize.map(|q| format!(" {q}")).unwrap_or_default()
        );
        let output = command.output().context("running a benchmark child process")?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            eprintln!("  skipped: {}", stderr.trim().lines().last().unwrap_or("failed"));
            continue;
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().context("benchmark child printed nothing")?;
        let result: ComboResult = serde_json::from_str(line).context("benchmark child output")?;
        let logits = read_npy(&logits_path)?;
        results.push((result, logits));
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let reference_logits = results
        .iter()
        .find(|(r, _)| r.device == "cpu" && r.dtype == "f32" && r.quantize.is_none())
        .map(|(_, l)| l.clone());
    let mut table = Vec::new();
    for (mut result, logits) in results {
        if let Some(reference) = &reference_logits
            && reference.len() == logits.len()
        {
            let diff = reference
                .iter()
                .zip(&logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            result.max_abs_logit_diff_vs_cpu_f32 = Some(diff);
        }
        if json {
            println!("{}", serde_json::to_string(&result)?);
        }
        table.push(result);
    }
    if !json {
        print!("{}", render_table(&table));
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vipllava-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn read_npy(path: &Path) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).with_context(|| format!("parsing {}", path.display()))?;
    Ok(npy.into_vec::<f32>()?)
}
