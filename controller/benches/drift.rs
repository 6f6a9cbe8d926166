//! Drift detection measured on the seeded simulator (`controller::drift::sim`), next to the rules
//! a user would otherwise pick, on the same windows: fixed PSI thresholds (Evidently's 0.1 and
//! 0.2, on the reference deciles) and a two-sample Kolmogorov–Smirnov test at p < 0.05 against
//! the 50,000-row training sample. Prints Markdown tables: false alarms per feature per 100
//! drift-free windows, and the detection delay (windows from the first drifted one to the
//! alarm) for each drift and distribution; then the CUSUM performance chart's figures.
//! Deterministic for a given `--seed`; timing is not measured.
//!
//! ```sh
//! cargo bench -p edgefleet-controller --bench drift -- --windows 2000 --runs 200
//! ```

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use edgefleet_controller::drift::calibrate::check_thresholds;
use edgefleet_controller::drift::detector::DetectorConfig;
use edgefleet_controller::drift::performance::ChartConfig;
use edgefleet_controller::drift::sim::{
    Delays, Rule, Runs, Scenario, Shape, Simulation, chart_runs,
};

#[derive(Debug, Parser)]
struct Args {
    /// Rows per window to measure at.
    #[arg(long, value_delimiter = ',', default_values_t = [100u64, 500, 1000, 5000])]
    sizes: Vec<u64>,
    /// Drift-free windows for the false-alarm count.
    #[arg(long, default_value_t = 2000)]
    windows: u32,
    /// Runs per drift and distribution for the delays.
    #[arg(long, default_value_t = 200)]
    runs: u32,
    /// Windows a run may take before it counts as not detected.
    #[arg(long, default_value_t = 20)]
    max_windows: u32,
    /// Features of each distribution in the simulated model.
    #[arg(long, default_value_t = 3)]
    per_shape: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn delay_cell(d: &Delays) -> String {
    match d.mean() {
        None => format!("— (0/{})", d.runs),
        Some(mean) => {
            let p90 = d
                .quantile(0.9)
                .map_or(format!(">{}", d.max_windows), |q| q.to_string());
            let share = d.detected_share();
            if share < 1.0 {
                format!("{mean:.2} / {p90} ({:.1}%)", share * 100.0)
            } else {
                format!("{mean:.2} / {p90}")
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let config = DetectorConfig::default();
    let sim = Simulation::new(args.per_shape, config.clone(), args.seed)?;
    let f = sim.n_features();
    let threshold = config.alpha / f as f64;
    let shapes: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
    let mut out = String::new();
    writeln!(
        out,
        "Simulated model: {f} features ({} of each: {}); references from {} training rows each; \
         detector defaults (α = {}, flag at p < α/F = {threshold:.5}, 2 consecutive windows). \
         Seed {}, {} drift-free windows, {} runs per drift (at most {} windows each).\n",
        args.per_shape,
        shapes.join(", "),
        edgefleet_controller::drift::sim::TRAINING_ROWS,
        config.alpha,
        args.seed,
        args.windows,
        args.runs,
        args.max_windows
    )?;

    writeln!(
        out,
        "### False alarms per feature per 100 drift-free windows\n\n| rows/window | rule | {} |\n|---|---|{}",
        shapes.join(" | "),
        "---:|".repeat(shapes.len())
    )?;
    for &n in &args.sizes {
        let report = sim.false_alarms(n, args.windows, &Rule::ALL, args.seed ^ n)?;
        for rule in Rule::ALL {
            let cells: Vec<String> = Shape::ALL
                .iter()
                .filter_map(|shape| {
                    report
                        .iter()
                        .find(|r| r.rule == rule && r.shape == *shape)
                        .map(|r| format!("{:.2}", r.per_100_windows()))
                })
                .collect();
            writeln!(out, "| {n} | {} | {} |", rule.name(), cells.join(" | "))?;
        }
    }

    for scenario in Scenario::GOALS {
        writeln!(
            out,
            "\n### Detection delay, {}: mean / p90 windows (detected share if not all)\n\n| rows/window | rule | {} |\n|---|---|{}",
            scenario.name(),
            shapes.join(" | "),
            "---:|".repeat(shapes.len())
        )?;
        for &n in &args.sizes {
            let mut by_shape = Vec::new();
            for (i, shape) in Shape::ALL.into_iter().enumerate() {
                by_shape.push(sim.delays(
                    n,
                    shape,
                    scenario,
                    &Rule::ALL,
                    Runs {
                        runs: args.runs,
                        max_windows: args.max_windows,
                        seed: args.seed ^ n ^ ((i as u64) << 8),
                    },
                )?);
            }
            for (r, rule) in Rule::ALL.into_iter().enumerate() {
                let cells: Vec<String> = by_shape.iter().map(|d| delay_cell(&d[r])).collect();
                writeln!(out, "| {n} | {} | {} |", rule.name(), cells.join(" | "))?;
            }
        }
    }

    writeln!(
        out,
        "\n### Reference null check (`check_thresholds`, {} windows drawn from the reference shares)\n\n| rows/window | worst rate at p < α | mean PSI p99 | mean JS p99 |\n|---|---:|---:|---:|",
        args.windows
    )?;
    for &n in &args.sizes {
        let check = check_thresholds(
            sim.reference(),
            &DetectorConfig {
                window_samples: n,
                max_samples: n.max(config.max_samples),
                ..config.clone()
            },
            args.windows,
            args.seed ^ n,
        )?;
        let mean = |g: fn(&edgefleet_controller::drift::calibrate::FeatureCheck) -> f64| {
            check.features.iter().map(g).sum::<f64>() / check.features.len() as f64
        };
        writeln!(
            out,
            "| {n} | {:.4} | {:.4} | {:.4} |",
            check.worst_rate_at_alpha(),
            mean(|f| f.psi_p99),
            mean(|f| f.js_p99)
        )?;
    }

    let chart = ChartConfig::error_rate();
    writeln!(
        out,
        "\n### Performance chart (error-rate CUSUM, h = ln 10⁵), baseline 5% errors\n\n| labels/window | false alarms per 100 windows | 5% → 10%: mean / p90 windows | 5% → 7.5% |\n|---:|---:|---:|---:|"
    )?;
    for labels in [20u64, 100, 500] {
        let runs = |seed| Runs {
            runs: args.runs,
            max_windows: 200,
            seed,
        };
        let up = chart_runs(
            &chart,
            (0.05, 0.10),
            labels,
            args.windows * 5,
            runs(args.seed ^ labels),
        );
        let small = chart_runs(
            &chart,
            (0.05, 0.075),
            labels,
            0,
            runs(args.seed ^ labels ^ 2),
        );
        writeln!(
            out,
            "| {labels} | {:.3} | {} | {} |",
            100.0 * up.false_alarms as f64 / up.stationary_windows.max(1) as f64,
            delay_cell(&up.delays),
            delay_cell(&small.delays)
        )?;
    }
    writeln!(
        out,
        "\n(simulated in {:.1} s)",
        started.elapsed().as_secs_f64()
    )?;
    print!("{out}");
    Ok(())
}
