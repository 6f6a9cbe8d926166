//! `edgefleet-vad`: prints the speech segments of 16 kHz audio (a WAV file, or standard input),
//! with Silero VAD served by the local EdgeFleet agent; `synth` writes a test recording.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edgefleet_client::Client;
use edgefleet_vad::audio::AudioReader;
use edgefleet_vad::detector::{Detector, FRAME};
use edgefleet_vad::segments::{Segment, Segmenter, SegmenterConfig, ms};
use edgefleet_vad::synth;

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet-vad",
    version,
    about = "Speech segments of 16 kHz audio, with Silero VAD on the local EdgeFleet agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the speech segments of a recording or of a live stream, as they end.
    Detect(DetectArgs),
    /// Write a test recording (speech-like regions between silences) and print where its
    /// speech is, in the same format as `detect`.
    Synth {
        /// The WAV file to write (16 kHz, mono, 16-bit).
        #[arg(long)]
        out: PathBuf,
        /// One JSON object per segment.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct DetectArgs {
    /// A 16 kHz mono WAV file, or `-` for standard input.
    #[arg(default_value = "-")]
    input: PathBuf,
    /// The input is raw 16-bit little-endian PCM (e.g. `arecord -f S16_LE -r 16000 -c 1 -t raw`).
    #[arg(long)]
    raw: bool,
    /// The agent's Unix socket.
    #[arg(
        long,
        env = "EDGEFLEET_API_SOCKET",
        default_value = "/var/lib/edgefleet/agent.sock"
    )]
    socket: PathBuf,
    /// The agent's loopback TCP address instead of its socket, e.g. 127.0.0.1:8470.
    #[arg(long)]
    tcp: Option<std::net::SocketAddr>,
    /// One JSON object per segment: {"start_s":…,"end_s":…}.
    #[arg(long)]
    json: bool,
    /// Speech starts at a frame with at least this probability.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Speech ends after frames below this probability (default: threshold - 0.15).
    #[arg(long)]
    neg_threshold: Option<f32>,
    /// Silence that ends a segment, in ms.
    #[arg(long, default_value_t = 100)]
    min_silence_ms: u64,
    /// Shorter segments are dropped, in ms.
    #[arg(long, default_value_t = 250)]
    min_speech_ms: u64,
    /// Padding added on both sides of a segment, in ms.
    #[arg(long, default_value_t = 30)]
    pad_ms: u64,
    /// How long to keep retrying while the agent cannot answer (no model yet, worker restarting), in s.
    #[arg(long, default_value_t = 30)]
    retry_s: u64,
    /// Print each frame's time and speech probability to standard error.
    #[arg(long)]
    trace: bool,
}

fn print_segment(out: &mut impl Write, segment: Segment, json: bool) -> Result<()> {
    let seconds = segment.seconds();
    if json {
        writeln!(out, "{}", serde_json::to_string(&seconds)?)?;
    } else {
        writeln!(
            out,
            "speech {:.3} s - {:.3} s ({:.3} s)",
            seconds.start_s,
            seconds.end_s,
            seconds.end_s - seconds.start_s
        )?;
    }
    // Each line as soon as its segment ends, also through a pipe.
    out.flush()?;
    Ok(())
}

fn detect(args: &DetectArgs) -> Result<()> {
    let neg_threshold = args.neg_threshold.unwrap_or(args.threshold - 0.15);
    if !(0.0..=1.0).contains(&args.threshold) || !(0.0..=args.threshold).contains(&neg_threshold) {
        anyhow::bail!(
            "thresholds must satisfy 0 <= --neg-threshold <= --threshold <= 1 (got {neg_threshold} and {})",
            args.threshold
        );
    }
    let input: Box<dyn std::io::Read> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&args.input)
                .with_context(|| format!("cannot open {}", args.input.display()))?,
        )
    };
    let mut audio = if args.raw {
        AudioReader::raw_s16le(input)
    } else {
        AudioReader::wav(input)?
    };
    let client = match args.tcp {
        Some(addr) => Client::tcp(addr),
        None => Client::unix(&args.socket),
    };
    let (mut detector, info) = Detector::connect(client, Duration::from_secs(args.retry_s))?;
    eprintln!(
        "edgefleet-vad: {}@{} (release {}) on the local agent",
        info.model.name, info.model.version, info.model.release
    );
    let mut segmenter = Segmenter::new(SegmenterConfig {
        threshold: args.threshold,
        neg_threshold,
        min_silence: ms(args.min_silence_ms),
        min_speech: ms(args.min_speech_ms),
        pad: ms(args.pad_ms),
    });
    let mut stdout = std::io::stdout().lock();
    let mut frame = [0.0f32; FRAME];
    let mut segments = 0u64;
    loop {
        let read = audio.read(&mut frame)?;
        if read == 0 {
            break;
        }
        // The last, short frame is padded with silence; only its real samples count.
        frame[read..].fill(0.0);
        let probability = detector.probability(&frame)?;
        if args.trace {
            eprintln!(
                "frame {:.3} s p={probability:.3}",
                (detector.frames - 1) as f64 * FRAME as f64 / 16_000.0
            );
        }
        if let Some(segment) = segmenter.push(read as u64, probability) {
            print_segment(&mut stdout, segment, args.json)?;
            segments += 1;
        }
        if read < FRAME {
            break;
        }
    }
    if let Some(segment) = segmenter.finish() {
        print_segment(&mut stdout, segment, args.json)?;
        segments += 1;
    }
    eprintln!(
        "edgefleet-vad: {segments} speech segments in {} frames ({:.2} s of audio), mean inference {} us{}",
        detector.frames,
        detector.frames as f64 * FRAME as f64 / 16_000.0,
        detector.latency_us / detector.frames.max(1),
        match detector.model_changes {
            0 => String::new(),
            n => format!(", the model changed {n} times (state reset)"),
        }
    );
    Ok(())
}

fn synth_command(out: &std::path::Path, json: bool) -> Result<()> {
    synth::write_wav(out).with_context(|| format!("cannot write {}", out.display()))?;
    let mut stdout = std::io::stdout().lock();
    for segment in synth::speech() {
        print_segment(&mut stdout, segment, json)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Detect(args) => detect(args),
        Command::Synth { out, json } => synth_command(out, *json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
