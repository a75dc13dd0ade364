use std::time::Duration;

use pipeline_engine::{Device, ExecOptions};

use crate::support::{v, Project, DIAMOND};

#[test]
fn cold_warm_edit_reruns_exactly_the_changed_stages_and_reverting_hits() {
    let p = Project::new(DIAMOND);
    let cold = p.run().ok();
    assert_eq!(cold.with_status("ran"), v(&["a", "b", "c", "d", "e"]));
    assert_eq!(p.out_text(&cold, "e"), "ECBAD");

    let warm = p.run().ok();
    assert_eq!(warm.with_status("cached"), v(&["a", "b", "c", "d", "e"]));
    assert!(warm.reasons().is_empty(), "nothing dispatched");

    p.edit("params.text = \"B\"", "params.text = \"B2\"");
    let edited = p.run().ok();
    assert_eq!(edited.with_status("ran"), v(&["b", "c", "e"]));
    assert_eq!(edited.with_status("cached"), v(&["a", "d"]));
    assert_eq!(p.out_text(&edited, "e"), "ECB2AD");

    // Undoing the edit finds the old entries again.
    p.edit("params.text = \"B2\"", "params.text = \"B\"");
    let reverted = p.run().ok();
    assert_eq!(reverted.with_status("cached").len(), 5);
    assert_eq!(reverted.output_digest("e"), cold.output_digest("e"));
}

#[test]
fn early_cutoff_keeps_downstream_cached() {
    let p = Project::new(DIAMOND);
    p.run().ok();
    p.edit("params.salt = 1", "params.salt = 2");
    let r = p.run().ok();
    assert_eq!(r.with_status("ran"), v(&["b"]), "b's output is byte-identical, so c and e stay cached");
    assert_eq!(r.with_status("cached"), v(&["a", "c", "d", "e"]));
}

#[test]
fn files_enter_the_key_by_content_and_a_copied_project_stays_cached() {
    let p = Project::new(
        r#"
[pipeline]
name = "f"
[stages.raw]
kind = "files"
params.paths = ["data/in.txt"]
[stages.all]
kind = "concat"
inputs.parts = "raw.data"
"#,
    );
    p.write("data/in.txt", "one\n");
    assert_eq!(p.run().ok().with_status("ran"), v(&["all", "raw"]));
    // Same content, new mtime: cached.
    std::thread::sleep(Duration::from_millis(20));
    p.write("data/in.txt", "one\n");
    assert_eq!(p.run().ok().with_status("cached"), v(&["all", "raw"]));
    p.write("data/in.txt", "two\n");
    assert_eq!(p.run().ok().with_status("ran"), v(&["all", "raw"]));
    // Copy the whole project (cache included) elsewhere: still valid.
    let other = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", p.path().display()))
        .arg(other.path())
        .status()
        .unwrap();
    assert!(status.success());
    let moved = Project { dir: other, registry: crate::support::registry() };
    assert_eq!(moved.run().ok().with_status("cached"), v(&["all", "raw"]));
}

#[test]
fn the_device_reaches_the_stage_and_stays_out_of_the_key() {
    let p = Project::new(DIAMOND);
    let gpu = ExecOptions { device: Device::Cuda { ordinal: 1 }, until: v(&["a"]), ..Default::default() };
    let r = p.run_with(&gpu).ok();
    assert_eq!(r.outcome("a").report.as_ref().unwrap()["device"], "cuda:1");
    let cpu = ExecOptions { until: v(&["a"]), ..Default::default() };
    let r = p.run_with(&cpu).ok();
    assert_eq!(r.with_status("cached"), v(&["a"]), "a stage run on a GPU stays cached for a CPU run");
    let r = p.run_with(&ExecOptions { force: v(&["a"]), ..cpu }).ok();
    assert_eq!(r.outcome("a").report.as_ref().unwrap()["device"], "cpu");
}
