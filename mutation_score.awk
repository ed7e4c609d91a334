# Mutation score per module from `mutmut results --all true` (lines "module.xfunction__mutmut_N: status").
# Killed (a test failed) and timeout (a test hung) count as caught; "not checked" mutants were not run yet.
{
    module = $1; sub(/^ +/, "", module); sub(/\.x.*/, "", module); status = $2
    modules[module] = 1; count[module, status]++; count["all", status]++
}
END {
    printf "%-40s %7s %7s %8s %8s %12s  %s\n", "module", "caught", "run", "survived", "no tests", "not checked", "score"
    n = 0; for (m in modules) names[++n] = m
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (names[j] < names[i]) { t = names[i]; names[i] = names[j]; names[j] = t }
    names[++n] = "all"
    for (i = 1; i <= n; i++) {
        m = names[i]
        caught = count[m, "killed"] + count[m, "timeout"]
        run = caught + count[m, "survived"] + count[m, "no tests"] + count[m, "suspicious"] + count[m, "segfault"]
        printf "%-40s %7d %7d %8d %8d %12d  %s\n", m, caught, run, count[m, "survived"], count[m, "no tests"], \
               count[m, "not checked"], run ? sprintf("%.1f%%", 100 * caught / run) : "-"
    }
}
