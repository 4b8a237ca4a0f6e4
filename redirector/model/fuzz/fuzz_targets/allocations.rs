//! The tunnel address allocation store (a file or a ConfigMap several replicas write): parsing
//! never panics, and what parses renders to text that parses to the same allocations.
#![no_main]
use edge_model::allocations;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(a) = allocations::parse(text, "fuzz") {
        let again =
            allocations::parse(&allocations::render(&a), "rendered").expect("rendered parses");
        assert_eq!(again, a);
    } else if let Err(e) = allocations::parse(text, "fuzz") {
        assert!(
            e.starts_with("fuzz:"),
            "the error names the source and line: {e}"
        );
    }
});
