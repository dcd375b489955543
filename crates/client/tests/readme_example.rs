//! The README's client example is the body of `examples/call_handling.rs`
//! (which `cargo test` compiles): the two stay the same.

#[test]
fn the_readme_shows_the_example_that_compiles() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/call_handling.rs"
    ))
    .unwrap();
    let body: Vec<&str> = example.split("    // --- README ---\n").collect();
    assert_eq!(body.len(), 3, "the example marks its README part twice");
    let dedented: String = body[1]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let shown = format!("```rust\n{dedented}```");
    assert!(
        readme.contains(&shown),
        "README.md must show the body of examples/call_handling.rs:\n{shown}"
    );
}
