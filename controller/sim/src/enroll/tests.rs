//! Unit tests of `enroll`: how long a rate-limited caller waits.

use std::time::Duration;

use super::retry_after;

#[test]
fn a_rate_limited_answer_is_waited_out_as_the_controller_says() {
    let wait = |m| retry_after(m);
    assert_eq!(
        wait("rate_limited: too many requests for this token; retry in 7 s"),
        Duration::from_secs(7)
    );
    assert_eq!(
        wait("rate_limited: too many enrollment attempts from this address; retry in 3 s"),
        Duration::from_secs(3)
    );
    assert_eq!(wait("429 Too Many Requests"), Duration::from_secs(1));
    assert_eq!(wait("retry in 9999 s"), Duration::from_secs(60), "bounded");
}
