//! Compile-time checks of the macros: each file in `ui/` is a mistake a user can make, and its
//! `.stderr` pins the one error farine gives for it. `ui/pass_*.rs` must compile.

#[test]
fn macro_errors_point_at_the_mistake_and_say_what_is_expected() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass_*.rs");
    cases.compile_fail("tests/ui/fail_*.rs");
}
