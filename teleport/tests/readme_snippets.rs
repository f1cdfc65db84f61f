//! The README's Rust snippets that are not doc tests are kept in examples
//! that CI runs; this checks the README still shows exactly their lines.

/// The lines of the first ```rust block after `heading` in the README.
fn readme_block(readme: &str, heading: &str) -> Vec<String> {
    let after = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("the README has a {heading:?} section"))
        .1;
    let block = after
        .split_once("```rust\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("the {heading:?} section has a rust block"))
        .0;
    block
        .trim_end()
        .lines()
        .map(|line| line.trim().to_owned())
        .collect()
}

/// The lines of `source` between its README markers.
fn marked(source: &str) -> Vec<String> {
    let inner = source
        .split_once("// --- README: Named queues ---\n")
        .and_then(|(_, rest)| rest.split_once("// --- end ---"))
        .expect("the example marks the README's lines")
        .0;
    inner
        .trim_end()
        .lines()
        .map(|line| line.trim().to_owned())
        .collect()
}

#[test]
fn the_readme_queue_snippet_is_the_example_that_runs() {
    let readme = include_str!("../../README.md");
    let example = include_str!("../examples/readme_queues.rs");
    assert_eq!(
        readme_block(readme, "## Named queues"),
        marked(example),
        "README.md's queue snippet and examples/readme_queues.rs differ: change both"
    );
}
