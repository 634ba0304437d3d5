//! `meshgate analyze`: validation without serving, with findings and exit status.

mod support;

use support::{analyze, scratch_dir};

#[test]
fn analyze_reports_findings_and_fails_only_on_errors() {
    let dir = scratch_dir("analyze");
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: ok\nspec:\n  hosts: [a.example.com]\n  http:\n  - match: [{uri: {prefix: /}, statPrefix: ok}]\n    route:\n    - destination:\n        host: a.example.com\n",
    )
    .expect("write");
    let (code, stdout) = analyze(&good);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("warning: ") && stdout.contains("spec.http[0].match[0].statPrefix"),
        "{stdout}"
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: broken\nspec:\n  hosts: [a.example.com]\n  http:\n  - match:\n    - uri: {regex: \"(\"}\n    route:\n    - destination: {host: a.example.com}\n",
    )
    .expect("write");
    let (code, stdout) = analyze(&dir);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("error: ")
            && stdout.contains("bad.yaml")
            && stdout.contains("VirtualService default/broken")
            && stdout.contains("spec.http[0].match[0].uri.regex"),
        "{stdout}"
    );
}
