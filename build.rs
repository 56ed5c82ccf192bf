//! Embeds every `shaders/*.wgsl` into the binary as a name -> source table, so
//! adding a shader file needs no registration anywhere else.
use std::{env, fs, path::Path};

fn main() {
    // Read at run time, not `env!` (compile time): a build script compiled in
    // another checkout (a copied target/) must still embed this checkout's shaders.
    let dir = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("shaders");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<_> = fs::read_dir(&dir)
        .expect("shaders/ directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().map(|x| x == "wgsl").unwrap_or(false))
        .collect();
    names.sort();
    let mut out = String::from(
        "/// (file stem, WGSL source) for every shaders/*.wgsl\npub static SHADERS: &[(&str, &str)] = &[\n",
    );
    for p in &names {
        println!("cargo:rerun-if-changed={}", p.display());
        let stem = p.file_stem().unwrap().to_str().unwrap();
        out.push_str(&format!("    ({stem:?}, include_str!({:?})),\n", p.display().to_string()));
    }
    out.push_str("];\n");
    fs::write(Path::new(&env::var("OUT_DIR").unwrap()).join("shaders.rs"), out).unwrap();
}
