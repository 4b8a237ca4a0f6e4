//! Run-time state survives a restart: a port added with `redirector ports add` stays
//! redirected while `redirector run` is SIGKILLed and started again, and not one connection to
//! it escapes to the real address in between. Root only.
use std::{thread, time::Duration};

use redirector_tests::World;

#[test]
fn a_port_added_at_run_time_survives_a_sigkill_and_restart_with_nothing_escaping() {
    let w = World::new();
    let mut first = w.start_redirector(&[]);
    // 9100 is not in --ports (the defaults): it is redirected only because of `ports add`.
    let out = w.cli(&["ports", "add", "9100"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("add them to --ports"),
        "ports add says how to make it lasting: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The edge host really listens on 9100: an escaped connection is answered "edge ...".
    let target = "198.51.100.10:9100";
    let client = w.connect_loop(target, 3000);
    thread::sleep(Duration::from_millis(500));
    first.sigkill();
    thread::sleep(Duration::from_millis(500));
    let second = w.start_redirector(&[]);
    let summary = client.summary();

    assert_eq!(summary["failed"], 0, "{summary}");
    assert!(
        summary["ok"].as_u64().unwrap() > 50,
        "the loop made too few connections to mean anything: {summary}"
    );
    let labels = summary["labels"].as_object().unwrap();
    assert_eq!(
        labels.keys().collect::<Vec<_>>(),
        [&format!("ingress {target} pod=false")],
        "every connection, before, during and after the restart, reached the ingress: {summary}"
    );
    assert!(w.edge_log.is_empty(), "escaped: {:?}", w.edge_log.all());
    // The restart kept the run-time port and said so.
    assert!(
        second
            .log()
            .contains("ports added at run time are still redirected")
            && second.log().contains("9100"),
        "{}",
        second.log()
    );
    let out = w.cli(&["ports", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "9100,10250,10255,10350"
    );
}
