//! Training metrics on disk: one record per optimizer step written to `metrics.jsonl` and
//! `metrics.csv` side by side (same fields, same order), and the loss curve drawn as a small
//! hand-written SVG (`loss.svg`): training loss per step, and eval loss where it was measured.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const METRICS_JSONL: &str = "metrics.jsonl";
pub const METRICS_CSV: &str = "metrics.csv";
pub const LOSS_SVG: &str = "loss.svg";

/// The CSV header, in [`StepRecord`]'s field order.
const CSV_HEADER: &str = "step,epoch,loss,lr,grad_norm,tokens,label_tokens,tokens_per_s,elapsed_s,peak_rss_mib,eval_loss,skipped,eval_accuracy";

/// One optimizer step. Floats are written in Rust's shortest round-trip form, so a reader gets
/// back the exact values (a resumed run's losses compare bit for bit).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// Passes over the training rows completed, fractional.
    pub epoch: f64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub label_tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Peak resident memory of the process so far, MiB (`VmHWM`; None where it cannot be read).
    /// Files written before it was the peak call it `rss_mib`.
    #[serde(alias = "rss_mib")]
    pub peak_rss_mib: Option<f64>,
    /// Mean loss over the eval set after this step, when evaluated.
    pub eval_loss: Option<f64>,
    pub skipped: bool,
    /// Multiple-choice accuracy on the eval set after this step, when evaluated on an all-MCQA
    /// eval file (absent in files written before it was recorded).
    #[serde(default)]
    pub eval_accuracy: Option<f64>,
}

impl StepRecord {
    fn csv_row(&self) -> String {
        let opt = |x: Option<f64>| x.map(|v| format!("{v:?}")).unwrap_or_default();
        format!(
            "{},{:?},{:?},{:?},{:?},{},{},{:?},{:?},{},{},{},{}",
            self.step,
            self.epoch,
            self.loss,
            self.lr,
            self.grad_norm,
            self.tokens,
            self.label_tokens,
            self.tokens_per_s,
            self.elapsed_s,
            opt(self.peak_rss_mib),
            opt(self.eval_loss),
            self.skipped,
            opt(self.eval_accuracy)
        )
    }
}

/// Appends [`StepRecord`]s to `metrics.jsonl` and `metrics.csv` in a folder.
pub struct MetricsWriter {
    jsonl_path: PathBuf,
    csv_path: PathBuf,
    jsonl: BufWriter<File>,
    csv: BufWriter<File>,
    records: Vec<StepRecord>,
}

/// Records of `metrics.jsonl` in `dir` (empty when the file is missing).
pub fn read_metrics(dir: &Path) -> Result<Vec<StepRecord>> {
    let path = dir.join(METRICS_JSONL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| Error::Dataset {
                path: path.clone(),
                line: i + 1,
                reason: format!("not a metrics record: {e}"),
            })
        })
        .collect()
}

/// The lines of `metrics.jsonl` in `dir` a run resumed after `step` keeps, verbatim, with their
/// records: those of steps ≤ `step`. Rows after them are dropped unread, so a line torn by a
/// kill after the checkpoint (or any damage there) does not stop the resume; a damaged row among
/// the kept ones is an error naming the line.
fn kept_lines(dir: &Path, step: u64) -> Result<Vec<(String, StepRecord)>> {
    let path = dir.join(METRICS_JSONL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut kept = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: StepRecord = match serde_json::from_str(line) {
            Ok(r) => r,
            // Steps are written in order: past the checkpoint's step, the rest goes unread.
            Err(_)
                if kept
                    .last()
                    .is_some_and(|(_, r): &(String, StepRecord)| r.step >= step) =>
            {
                break
            }
            Err(e) => {
                return Err(Error::Dataset {
                    path: path.clone(),
                    line: i + 1,
                    reason: format!("not a metrics record: {e}"),
                })
            }
        };
        if record.step > step {
            break;
        }
        kept.push((line.to_string(), record));
    }
    Ok(kept)
}

impl MetricsWriter {
    /// Starts the files in `dir`. With `keep_through = Some(step)` (a resumed run) the rows of
    /// steps ≤ `step` already there are kept byte for byte and later ones dropped (see
    /// [`kept_lines`]); otherwise the files start empty.
    pub fn create(dir: &Path, keep_through: Option<u64>) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let kept = match keep_through {
            Some(step) => kept_lines(dir, step)?,
            None => Vec::new(),
        };
        let jsonl_path = dir.join(METRICS_JSONL);
        let csv_path = dir.join(METRICS_CSV);
        let open = |path: &Path| -> Result<BufWriter<File>> {
            Ok(BufWriter::new(
                File::create(path).map_err(|e| Error::io(path, e))?,
            ))
        };
        let mut writer = MetricsWriter {
            jsonl: open(&jsonl_path)?,
            csv: open(&csv_path)?,
            jsonl_path,
            csv_path,
            records: Vec::new(),
        };
        writeln!(writer.csv, "{CSV_HEADER}").map_err(|e| Error::io(&writer.csv_path, e))?;
        for (line, record) in kept {
            writer.write_line(&line, record)?;
        }
        writer.flush()?;
        Ok(writer)
    }

    /// Writes one record to both files.
    pub fn write(&mut self, record: StepRecord) -> Result<()> {
        let line =
            serde_json::to_string(&record).map_err(|e| Error::encode("a metrics record", e))?;
        self.write_line(&line, record)
    }

    /// Writes `line` (the JSON of `record`) to `metrics.jsonl` and `record` to the CSV.
    fn write_line(&mut self, line: &str, record: StepRecord) -> Result<()> {
        writeln!(self.jsonl, "{line}").map_err(|e| Error::io(&self.jsonl_path, e))?;
        writeln!(self.csv, "{}", record.csv_row()).map_err(|e| Error::io(&self.csv_path, e))?;
        self.records.push(record);
        Ok(())
    }

    /// Flushes both files (called at each checkpoint, so they agree with it on disk).
    pub fn flush(&mut self) -> Result<()> {
        self.jsonl
            .flush()
            .map_err(|e| Error::io(&self.jsonl_path, e))?;
        self.csv.flush().map_err(|e| Error::io(&self.csv_path, e))
    }

    /// Every record written, the kept ones of a resumed run first.
    pub fn records(&self) -> &[StepRecord] {
        &self.records
    }
}

const SVG_WIDTH: f64 = 720.0;
const SVG_HEIGHT: f64 = 420.0;
/// Left, right, top, bottom margins around the plot area (room for tick labels).
const MARGIN: [f64; 4] = [70.0, 20.0, 40.0, 50.0];

/// The loss curve of `records` as an SVG document: training loss per step (blue line), eval loss
/// (orange points and line) where present, linear axes with five ticks each.
pub fn loss_curve_svg(records: &[StepRecord], title: &str) -> String {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| !r.skipped && r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss as f64))
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l)))
        .filter(|(_, l)| l.is_finite())
        .collect();
    let all = train.iter().chain(&eval);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    // A loss is never negative: the axis of one that is not stops at 0.
    let floor = if y0 >= 0.0 { 0.0 } else { f64::NEG_INFINITY };
    let (y0, y1) = ((y0 - pad).max(floor), y1 + pad);
    let [left, right, top, bottom] = MARGIN;
    let (w, h) = (SVG_WIDTH - left - right, SVG_HEIGHT - top - bottom);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * w;
    let py = |y: f64| top + (y1 - y) / (y1 - y0) * h;

    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{SVG_WIDTH}\" height=\"{SVG_HEIGHT}\" \
         viewBox=\"0 0 {SVG_WIDTH} {SVG_HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#444\"/>\n",
        SVG_WIDTH / 2.0,
        xml_escape(title)
    );
    // Whole steps once the ticks are at least two steps apart.
    let step_decimals = if x1 - x0 >= 8.0 { 0 } else { 2 };
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        svg.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3:.9$}</text>\n\
             <line x1=\"{left}\" y1=\"{4:.1}\" x2=\"{5:.1}\" y2=\"{4:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{6:.1}\" y=\"{7:.1}\" text-anchor=\"end\">{8:.4}</text>\n",
            px(xv),
            top + h,
            top + h + 18.0,
            xv,
            py(yv),
            left + w,
            left - 6.0,
            py(yv) + 4.0,
            yv,
            step_decimals
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text>\n\
         <text x=\"16\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {:.1})\">loss</text>\n",
        left + w / 2.0,
        SVG_HEIGHT - 10.0,
        top + h / 2.0,
        top + h / 2.0
    ));
    let polyline = |points: &[(f64, f64)], color: &str| -> String {
        let coords: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.2},{:.2}", px(x), py(y)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            coords.join(" ")
        )
    };
    if !train.is_empty() {
        svg.push_str(&polyline(&train, "#1f77b4"));
    }
    if !eval.is_empty() {
        svg.push_str(&polyline(&eval, "#ff7f0e"));
        for &(x, y) in &eval {
            svg.push_str(&format!(
                "<circle cx=\"{:.2}\" cy=\"{:.2}\" r=\"3\" fill=\"#ff7f0e\"/>\n",
                px(x),
                py(y)
            ));
        }
    }
    svg.push_str(&format!(
        "<text x=\"{0:.1}\" y=\"{1:.1}\" text-anchor=\"end\" fill=\"#1f77b4\">train loss</text>\n",
        left + w - 8.0,
        top + 16.0
    ));
    if !eval.is_empty() {
        svg.push_str(&format!(
            "<text x=\"{0:.1}\" y=\"{1:.1}\" text-anchor=\"end\" fill=\"#ff7f0e\">eval loss</text>\n",
            left + w - 8.0,
            top + 32.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes [`loss_curve_svg`] of `records` to `dir/loss.svg` and returns its path.
pub fn write_loss_curve(dir: &Path, records: &[StepRecord], title: &str) -> Result<PathBuf> {
    let path = dir.join(LOSS_SVG);
    fs::write(&path, loss_curve_svg(records, title)).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// Peak resident set size of this process so far in MiB (`VmHWM` of `/proc/self/status`, Linux;
/// None elsewhere): what the machine had to hold, not what happens to be resident at the step.
pub fn peak_rss_mib() -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
