//! The `pipeline` command line.

fn main() {
    let registry = pipeline_stages::registry();
    for kind in registry.kinds() {
        println!("{kind}");
    }
}
