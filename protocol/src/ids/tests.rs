use super::*;

#[test]
fn device_ids_refuse_wildcards_separators_and_controls() {
    for bad in ["a+b", "a#", "a/b", "nul\0", "tab\t", "", "..", "é", "a b"] {
        assert!(DeviceId::new(bad).is_err(), "{bad:?} must be refused");
    }
    let long = "d".repeat(DeviceId::MAX_LEN + 1);
    assert_eq!(
        DeviceId::new(long).unwrap_err(),
        IdError::TooLong {
            kind: "device id",
            len: 129,
            max: 128
        }
    );
    assert_eq!(
        DeviceId::new("pump-07.site_3").unwrap().as_str(),
        "pump-07.site_3"
    );
}

#[test]
fn id_error_names_the_character_and_position() {
    let err = DeviceId::new("ab+c").unwrap_err().to_string();
    assert_eq!(
        err,
        "device id \"ab+c\" contains '+' at byte 2; allowed are letters, digits and ._-"
    );
}

#[test]
fn arch_any_accepts_every_device() {
    let aarch64: Arch = "aarch64".parse().unwrap();
    assert!(Arch::any().accepts(&aarch64));
    assert!(aarch64.accepts(&aarch64));
    assert!(!aarch64.accepts(&"x86_64".parse().unwrap()));
}

#[test]
fn tensor_names_may_have_slashes_but_payload_file_names_may_not() {
    assert!(TensorName::new("save_infer_model/scale_0.tmp_1").is_ok());
    assert!(is_file_name("model.onnx"));
    for bad in ["a/b", "..", ".", "../x"] {
        assert!(!is_file_name(bad), "{bad}");
    }
}
