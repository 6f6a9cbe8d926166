//! The simulation matches the training data's statistics and its faults push readings into the
//! fault patterns; recorded CSV is read or refused with the line.

use super::*;

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0.0), |(s, n), v| (s + v, n + 1.0));
    sum / n
}

#[test]
fn normal_readings_follow_the_training_distribution() {
    let mut pump = Pump::new(1, None);
    let readings: Vec<Reading> = (0..4000).map(|_| pump.next_reading()).collect();
    // metrics.json: means 52.9 °C, 3.11 mm/s, 12.36 A, 5.82 bar; 10.8% anomalies.
    let expected = [52.9, 3.11, 12.36, 5.82];
    for (i, want) in expected.iter().enumerate() {
        let got = mean(readings.iter().map(|r| r.values[i]));
        assert!(
            (got - want).abs() < 0.03 * want,
            "{}: {got} vs {want}",
            FEATURES[i]
        );
    }
    let anomalies = mean(readings.iter().map(|r| f64::from(r.label.unwrap())));
    assert!((0.08..0.14).contains(&anomalies), "{anomalies}");
    let again: Vec<Reading> = {
        let mut pump = Pump::new(1, None);
        (0..10).map(|_| pump.next_reading()).collect()
    };
    assert_eq!(again, readings[..10], "a seed repeats its readings");
}

#[test]
fn an_injected_fault_develops_and_is_labelled() {
    for fault in [Fault::Bearing, Fault::Cavitation] {
        let mut pump = Pump::new(3, Some((fault, 50)));
        let readings: Vec<Reading> = (0..150).map(|_| pump.next_reading()).collect();
        let rate = |r: &[Reading]| mean(r.iter().map(|r| f64::from(r.label.unwrap())));
        assert!(rate(&readings[..50]) < 0.25, "{fault:?} before");
        assert!(
            rate(&readings[60..]) > 0.9,
            "{fault:?} after: {}",
            rate(&readings[60..])
        );
    }
}

#[test]
fn recorded_readings_are_read_by_column_name() {
    let text = "pressure_bar,temperature_c,vibration_rms,current_a,label\n5.6,45.39,1.662,10.34,0\n5.1,70.2,6.5,12.0,\n";
    let readings: Vec<Reading> = read_csv(text.as_bytes()).map(Result::unwrap).collect();
    assert_eq!(
        readings,
        vec![
            Reading {
                values: [45.39, 1.662, 10.34, 5.6],
                label: Some(0)
            },
            Reading {
                values: [70.2, 6.5, 12.0, 5.1],
                label: None
            },
        ]
    );
    let bad: Vec<Result<Reading>> = read_csv(
        "temperature_c,vibration_rms,current_a,pressure_bar\n1,2,x,4\n5,6,7,8\n".as_bytes(),
    )
    .collect();
    assert_eq!(bad.len(), 1, "reading stops at the first bad line");
    let err = format!("{:#}", bad[0].as_ref().unwrap_err());
    assert!(err.contains("CSV line 2") && err.contains("\"x\""), "{err}");
    let err = read_csv("a,b\n1,2\n".as_bytes())
        .next()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("must name temperature_c"), "{err}");
}
