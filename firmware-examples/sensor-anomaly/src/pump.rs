//! The simulated pump: the generative model `controller/demo/train_sensor_model.py` trains the
//! demo classifier on — two hidden quantities (load, wear) and the ambient temperature drive four
//! correlated readings; a reading is an anomaly when a fault pattern holds (bearing overheating:
//! hot and shaking; cavitation: low pressure and shaking), with noise on the decision — plus
//! injectable faults that develop over ten readings. Also the CSV reader for recorded readings.

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Gamma, Normal};

/// The readings, in the model's input order.
pub const FEATURES: [&str; 4] = [
    "temperature_c",
    "vibration_rms",
    "current_a",
    "pressure_bar",
];
/// Decimal places of each reading, as the sensors (and the training data) report them.
const DECIMALS: [i32; 4] = [2, 3, 2, 3];
/// Readings over which an injected fault reaches its full strength.
const FAULT_RAMP: f64 = 10.0;

/// One reading and, when known, its ground truth (1: anomaly).
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub values: [f64; 4],
    pub label: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Temperature up by as much as 18 °C, vibration up to 2.2 times.
    Bearing,
    /// Pressure down by as much as 1.6 bar, vibration up to 1.8 times.
    Cavitation,
}

#[derive(Debug)]
pub struct Pump {
    rng: StdRng,
    fault: Option<(Fault, u64)>,
    next: u64,
}

fn normal(rng: &mut StdRng, mean: f64, std: f64) -> f64 {
    Normal::new(mean, std).map_or(mean, |d| d.sample(rng))
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

impl Pump {
    /// A pump whose readings follow `seed`; `fault` starts at that reading.
    pub fn new(seed: u64, fault: Option<(Fault, u64)>) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            fault,
            next: 0,
        }
    }

    pub fn next_reading(&mut self) -> Reading {
        let rng = &mut self.rng;
        let load = normal(rng, 0.0, 1.0);
        let wear = Gamma::new(2.0, 0.5).map_or(1.0, |d| d.sample(rng));
        let ambient = normal(rng, 0.0, 1.0);
        let current = 11.5 + 1.6 * load + 0.9 * wear + normal(rng, 0.0, 0.5);
        let mut temperature =
            48.0 + 4.5 * load + 5.0 * wear + 2.5 * ambient + normal(rng, 0.0, 1.5);
        let mut vibration =
            (2.2f64.ln() + 0.12 * load + 0.30 * wear + normal(rng, 0.0, 0.18)).exp();
        let mut pressure = 6.2 + 0.45 * load - 0.35 * wear + normal(rng, 0.0, 0.3);
        if let Some((fault, at)) = self.fault
            && self.next >= at
        {
            let strength = ((self.next - at + 1) as f64 / FAULT_RAMP).min(1.0);
            match fault {
                Fault::Bearing => {
                    temperature += 18.0 * strength;
                    vibration *= 1.0 + 1.2 * strength;
                }
                Fault::Cavitation => {
                    pressure -= 1.6 * strength;
                    vibration *= 1.0 + 0.8 * strength;
                }
            }
        }
        // The training labels: either fault pattern, with noise blurring the boundary.
        let bearing = ((temperature - 64.0) / 4.0).min((vibration - 3.8) / 0.8);
        let cavitation = ((5.2 - pressure) / 0.35).min((vibration - 3.2) / 0.6);
        let score = bearing.max(cavitation) + normal(rng, 0.0, 0.5);
        self.next += 1;
        let raw = [temperature, vibration, current, pressure];
        Reading {
            values: std::array::from_fn(|i| round(raw[i], DECIMALS[i])),
            label: Some(u32::from(score > 0.0)),
        }
    }
}

/// Readings from CSV: a header naming the four readings (any order), an optional `label`
/// column (0 or 1).
pub fn read_csv(reader: impl std::io::Read) -> impl Iterator<Item = Result<Reading>> {
    let mut csv = csv::Reader::from_reader(reader);
    let columns = csv.headers().map(|headers| {
        let find = |name: &str| headers.iter().position(|h| h.trim() == name);
        let values: Option<Vec<usize>> = FEATURES.iter().map(|name| find(name)).collect();
        (values, find("label"))
    });
    let mut records = csv.into_records().enumerate();
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        let result = (|| -> Result<Option<Reading>> {
            let (Some(values), label) = columns
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .clone()
            else {
                bail!("the CSV header must name {}", FEATURES.join(", "));
            };
            let Some((line, record)) = records.next() else {
                return Ok(None);
            };
            let line = line + 2;
            let record = record.with_context(|| format!("CSV line {line}"))?;
            let field = |i: usize| -> Result<f64> {
                let text = record.get(i).unwrap_or_default().trim();
                text.parse()
                    .with_context(|| format!("CSV line {line}: {text:?} is not a number"))
            };
            let mut reading = [0.0; 4];
            for (slot, column) in reading.iter_mut().zip(&values) {
                *slot = field(*column)?;
            }
            let label = match label {
                None => None,
                Some(i) => match record.get(i).unwrap_or_default().trim() {
                    "" => None,
                    "0" => Some(0),
                    "1" => Some(1),
                    other => bail!("CSV line {line}: label {other:?} is not 0 or 1"),
                },
            };
            Ok(Some(Reading {
                values: reading,
                label,
            }))
        })();
        match result {
            Ok(reading) => reading.map(Ok),
            Err(err) => {
                failed = true;
                Some(Err(err))
            }
        }
    })
}

#[cfg(test)]
mod tests;
