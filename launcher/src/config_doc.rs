//! Keeps `docs/configuration.md` in step with the clap definitions.

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_and_env_var_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        let cli = crate::Cli::command();
        let mut missing = Vec::new();
        for sub in ["serve", "generate"] {
            let cmd = cli.find_subcommand(sub).expect("subcommand");
            for arg in cmd.get_arguments() {
                if let Some(long) = arg.get_long() {
                    if long != "help" && long != "version" && !doc.contains(&format!("`--{long}`"))
                    {
                        missing.push(format!("{sub} --{long}"));
                    }
                }
                if let Some(env) = arg.get_env() {
                    let env = env.to_string_lossy();
                    if !doc.contains(&format!("`{env}`")) {
                        missing.push(format!("{sub} {env}"));
                    }
                }
            }
        }
        for id in crate::serve_config::setting_ids() {
            let key = if id == "model" {
                "model_name".into()
            } else {
                id
            };
            if !doc.contains(&format!("| `{key}` |")) {
                missing.push(format!("manifest key {key}"));
            }
        }
        for arg in cli.get_arguments() {
            if let Some(long) = arg.get_long() {
                if !doc.contains(&format!("`--{long}`")) {
                    missing.push(format!("--{long}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "not in docs/configuration.md: {missing:?}"
        );
    }
}
