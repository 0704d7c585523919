/*
 * tiny: a small interpreted language.
 *
 *     tiny FILE...      run the files in order, sharing one global scope
 *     tiny --version    print the version
 *
 * Values are 64-bit integers and immutable strings. A program is a list of
 * statements: `print`, assignment, `if`/`else`, `while`, `fn` definitions,
 * `return` and expression statements. Newlines are not significant; `;` may
 * separate statements and `#` starts a comment.
 *
 * There is no syntax tree: every file is turned into tokens and the
 * interpreter walks the tokens directly. Each parsing function takes a `run`
 * flag. With run == 1 it evaluates what it parses; with run == 0 it only
 * parses, which is how the untaken branch of an `if`, the body of a function
 * definition and the rest of a block after `return` are stepped over. A call
 * jumps to the token where the function's body starts.
 *
 * Strings are never freed: a tiny script is short-lived.
 */
#include <ctype.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TINY_VERSION "0.4.0"
#define MAX_ARGS 8
#define MAX_DEPTH 2000

/* ------------------------------------------------------------------ tokens */

typedef enum {
    T_EOF, T_INT, T_STR, T_NAME,
    T_IF, T_ELSE, T_WHILE, T_FN, T_RETURN, T_PRINT, T_AND, T_OR, T_NOT,
    T_LPAREN, T_RPAREN, T_LBRACE, T_RBRACE, T_COMMA, T_SEMI, T_ASSIGN,
    T_EQ, T_NE, T_LT, T_LE, T_GT, T_GE,
    T_PLUS, T_MINUS, T_STAR, T_SLASH, T_PERCENT
} Kind;

/* How each kind is spelled in source and in error messages. */
static const char *const spelling[] = {
    "end of file", "number", "string", "name",
    "if", "else", "while", "fn", "return", "print", "and", "or", "not",
    "(", ")", "{", "}", ",", ";", "=",
    "==", "!=", "<", "<=", ">", ">=",
    "+", "-", "*", "/", "%"
};

typedef struct {
    Kind kind;
    long long num;    /* T_INT */
    char *text;       /* T_STR (escapes resolved) and T_NAME */
    const char *file;   /* where it was read */
    int line;
} Token;

static Token *toks;          /* the tokens of every file, each ending in T_EOF */
static size_t ntoks, captoks, pos;   /* pos: the token being looked at */

/* ------------------------------------------------------------ diagnostics */

static void die(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s:%d: error: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

#define die_at(tok, ...) die((tok)->file, (tok)->line, __VA_ARGS__)

/* An error that is not about a place in a script. */
static void fatal(const char *msg, const char *arg)
{
    fflush(stdout);
    fprintf(stderr, "tiny: %s%s\n", msg, arg);
    exit(1);
}

static void *xrealloc(void *p, size_t n)
{
    if (!(p = realloc(p, n ? n : 1))) fatal("out of memory", "");
    return p;
}

static void *xmalloc(size_t n) { return xrealloc(NULL, n); }

static char *new_string(const char *s, size_t n)
{
    char *r = xmalloc(n + 1);
    memcpy(r, s, n);
    r[n] = '\0';
    return r;
}

/* ------------------------------------------------------------------ lexer */

static void push(Token t)
{
    if (ntoks == captoks) {
        captoks = captoks ? 2 * captoks : 256;
        toks = xrealloc(toks, captoks * sizeof *toks);
    }
    toks[ntoks++] = t;
}

/* Reads a string literal starting after its opening quote; returns the
 * character after the closing quote. */
static const char *lex_string(const char *p, Token *t)
{
    const char *end = p;
    char *out;
    size_t n = 0;
    while (*end != '"') {
        if (*end == '\0' || *end == '\n') die(t->file, t->line, "unterminated string");
        end += (*end == '\\' && end[1] != '\0') ? 2 : 1;
    }
    out = xmalloc((size_t)(end - p) + 1);
    for (; p < end; p++) {
        if (*p != '\\') {
            out[n++] = *p;
            continue;
        }
        switch (*++p) {
        case 'n': out[n++] = '\n'; break;
        case 't': out[n++] = '\t'; break;
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        default: die(t->file, t->line, "unknown escape '\\%c' in string", *p);
        }
    }
    out[n] = '\0';
    t->kind = T_STR;
    t->text = out;
    return end + 1;
}

static void lex(const char *file, const char *src)
{
    const char *p = src;
    int line = 1;
    for (;;) {
        Token t = {T_EOF, 0, NULL, file, 0};
        while (isspace((unsigned char)*p) || *p == '#') {
            if (*p == '#')
                while (*p && *p != '\n')
                    p++;
            else if (*p++ == '\n')
                line++;
        }
        t.line = line;
        if (*p == '\0') {
            push(t);
            return;
        }
        if (isdigit((unsigned char)*p)) {
            t.kind = T_INT;
            while (isdigit((unsigned char)*p)) {
                int d = *p++ - '0';
                if (t.num > (LLONG_MAX - d) / 10) die(file, line, "number too large");
                t.num = t.num * 10 + d;
            }
        } else if (isalpha((unsigned char)*p) || *p == '_') {
            const char *start = p;
            size_t n;
            int k;
            while (isalnum((unsigned char)*p) || *p == '_') p++;
            n = (size_t)(p - start);
            t.kind = T_NAME;
            for (k = T_IF; k <= T_NOT; k++)
                if (strlen(spelling[k]) == n && !strncmp(spelling[k], start, n))
                    t.kind = (Kind)k;
            if (t.kind == T_NAME) t.text = new_string(start, n);
        } else if (*p == '"') {
            p = lex_string(p + 1, &t);
        } else {
            /* Operators: the longest spelling that matches ("<=" before "<"). */
            int k;
            size_t n = 0;
            for (k = T_LPAREN; k <= T_PERCENT; k++)
                if (!strncmp(p, spelling[k], strlen(spelling[k])) && strlen(spelling[k]) > n)
                    t.kind = (Kind)k, n = strlen(spelling[k]);
            if (!n) die(file, line, "unexpected character '%c'", *p);
            p += n;
        }
        push(t);
    }
}

/* ----------------------------------------------------------------- values */

typedef struct { int is_str; long long num; const char *str; } Value;

static Value num(long long n) { Value v = {0, n, NULL}; return v; }
static Value str(const char *s) { Value v = {1, 0, s}; return v; }
static int truthy(Value v) { return v.is_str ? v.str[0] != '\0' : v.num != 0; }
static const char *type_name(Value v) { return v.is_str ? "string" : "integer"; }

/* The text of a value; integers are formatted into buf. */
static const char *text(Value v, char buf[32])
{
    if (v.is_str) return v.str;
    snprintf(buf, 32, "%lld", v.num);
    return buf;
}

/* a + b where either side is a string: the texts joined. */
static Value concat(Value a, Value b)
{
    char ba[32], bb[32];
    const char *sa = text(a, ba), *sb = text(b, bb);
    size_t la = strlen(sa), lb = strlen(sb);
    char *r = xmalloc(la + lb + 1);
    memcpy(r, sa, la);
    memcpy(r + la, sb, lb + 1);
    return str(r);
}

/* ------------------------------------------------- variables and functions */

typedef struct Var { const char *name; Value val; struct Var *next; } Var;

typedef struct Func {
    const char *name, *params[MAX_ARGS];
    int nparams;
    size_t body;          /* index of the body's '{' */
    struct Func *next;
} Func;

static Var *globals;
static Var **locals;      /* the running function's variables, NULL at top level */
static Func *funcs;
static int depth;         /* calls in progress */
static int returning;     /* a `return` ran: skip to the end of the function */
static Value retval;

static Var *find_var(Var *v, const char *name)
{
    for (; v; v = v->next)
        if (!strcmp(v->name, name)) return v;
    return NULL;
}

static void set_var(Var **scope, const char *name, Value val)
{
    Var *v = find_var(*scope, name);
    if (!v) {
        v = xmalloc(sizeof *v);
        v->name = name;
        v->next = *scope;
        *scope = v;
    }
    v->val = val;
}

/* Inside a function: its variables, then the globals. */
static Value get_var(const Token *name)
{
    Var *v = locals ? find_var(*locals, name->text) : NULL;
    if (!v) v = find_var(globals, name->text);
    if (!v) die_at(name, "undefined variable '%s'", name->text);
    return v->val;
}

static Func *find_func(const char *name)
{
    Func *f;
    for (f = funcs; f; f = f->next)
        if (!strcmp(f->name, name)) return f;
    return NULL;
}

/* ------------------------------------------------------------------ parser */

static Token *peek(void) { return &toks[pos]; }
static int check(Kind k) { return toks[pos].kind == k; }

static int accept(Kind k) { return check(k) ? (pos++, 1) : 0; }

static Token *expect(Kind k, const char *what)
{
    Token *t = peek();
    const char *q = t->kind >= T_NAME ? "'" : "";   /* quote names and symbols */
    if (t->kind != k)
        die_at(t, "expected %s, found %s%s%s", what, q,
               t->kind == T_NAME ? t->text : spelling[t->kind], q);
    pos++;
    return t;
}

static Value expr(int run);
static void block(int run);

/* --------------------------------------------------------------- builtins */

static const struct { const char *name; int min, max; } builtins[] = {
    {"len", 1, 1}, {"upper", 1, 1}, {"lower", 1, 1}, {"substr", 3, 3},
    {"str", 1, 1}, {"assert", 1, 2},
};
#define NBUILTINS (sizeof builtins / sizeof builtins[0])

static int builtin_index(const char *name)
{
    int i;
    for (i = 0; i < (int)NBUILTINS; i++)
        if (!strcmp(builtins[i].name, name)) return i;
    return -1;
}

static void need(const Token *at, Value v, int want_str, int i)
{
    if (v.is_str != want_str)
        die_at(at, "argument %d of %s() must be a%s %s, not a%s %s", i + 1, at->text,
               want_str ? "" : "n", want_str ? "string" : "integer",
               v.is_str ? "" : "n", type_name(v));
}

static Value call_builtin(const Token *at, int b, Value *a, int n)
{
    const char *name = builtins[b].name;
    char buf[32];
    if (n < builtins[b].min || n > builtins[b].max)
        die_at(at, "%s() takes %d argument%s, got %d", name, builtins[b].max,
               builtins[b].max == 1 ? "" : "s", n);
    if (!strcmp(name, "len")) {
        need(at, a[0], 1, 0);
        return num((long long)strlen(a[0].str));
    }
    if (!strcmp(name, "upper") || !strcmp(name, "lower")) {
        char *r, *p;
        need(at, a[0], 1, 0);
        r = new_string(a[0].str, strlen(a[0].str));
        if (name[0] == 'u') {
            for (p = r; *p; p++)
                if (*p >= 'a' && *p <= 'z') *p = (char)(*p - 'a' + 'A');
        } else {
            for (p = r; *p; p++)
                if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');
        }
        return str(r);
    }
    if (!strcmp(name, "substr")) {
        /* substr(s, start, count), clamped to the string. */
        long long len, start, count;
        need(at, a[0], 1, 0);
        need(at, a[1], 0, 1);
        need(at, a[2], 0, 2);
        len = (long long)strlen(a[0].str);
        start = a[1].num < 0 ? 0 : a[1].num > len ? len : a[1].num;
        count = a[2].num < 0 ? 0 : a[2].num > len - start ? len - start : a[2].num;
        return str(new_string(a[0].str + start, (size_t)count));
    }
    if (!strcmp(name, "str")) {
        const char *s = text(a[0], buf);
        return str(new_string(s, strlen(s)));
    }
    /* assert(condition [, message]) */
    if (!truthy(a[0]))
        die_at(at, "assertion failed%s%s", n > 1 ? ": " : "", n > 1 ? text(a[1], buf) : "");
    return num(1);
}

/* name(args...), with the name consumed: a builtin or a user function. */
static Value call(const Token *name, int run)
{
    Value args[MAX_ARGS], result;
    int n = 0, b, i;
    Func *f;
    Var *frame = NULL, *next, **saved_locals;
    size_t saved_pos;
    expect(T_LPAREN, "'('");
    if (!check(T_RPAREN)) {
        do {
            if (n == MAX_ARGS)
                die_at(peek(), "too many arguments (at most %d)", MAX_ARGS);
            args[n++] = expr(run);
        } while (accept(T_COMMA));
    }
    expect(T_RPAREN, "')' after the arguments");
    if (!run) return num(0);
    if ((b = builtin_index(name->text)) >= 0) return call_builtin(name, b, args, n);
    if (!(f = find_func(name->text)))
        die_at(name, "undefined function '%s'", name->text);
    if (n != f->nparams)
        die_at(name, "%s() takes %d argument%s, got %d", f->name, f->nparams,
               f->nparams == 1 ? "" : "s", n);
    if (depth == MAX_DEPTH)
        die_at(name, "too much recursion (more than %d nested calls)", MAX_DEPTH);
    for (i = 0; i < n; i++) set_var(&frame, f->params[i], args[i]);
    saved_locals = locals;
    saved_pos = pos;
    locals = &frame;
    pos = f->body;
    depth++;
    block(1);
    depth--;
    result = returning ? retval : num(0);
    returning = 0;
    pos = saved_pos;
    locals = saved_locals;
    for (; frame; frame = next) {
        next = frame->next;
        free(frame);
    }
    return result;
}

/* ------------------------------------------------------------ expressions */

static Value primary(int run)
{
    Token *t = peek();
    Value v;
    switch (t->kind) {
    case T_INT: pos++; return num(t->num);
    case T_STR: pos++; return str(t->text);
    case T_NAME:
        pos++;
        if (check(T_LPAREN)) return call(t, run);
        return run ? get_var(t) : num(0);
    case T_LPAREN:
        pos++;
        v = expr(run);
        expect(T_RPAREN, "')'");
        return v;
    default:
        expect(T_INT, "an expression");   /* reports what was found */
        return num(0);
    }
}

static Value unary(int run)
{
    Token *op = peek();
    Value v;
    if (!accept(T_MINUS)) return primary(run);
    v = unary(run);
    if (!run) return v;
    if (v.is_str) die_at(op, "cannot negate a string");
    return num((long long)(0ULL - (unsigned long long)v.num));
}

/* + - * / % on two values; + joins when either side is a string. */
static Value arith(const Token *op, Value a, Value b)
{
    unsigned long long x = (unsigned long long)a.num, y = (unsigned long long)b.num;
    if (op->kind == T_PLUS && (a.is_str || b.is_str)) return concat(a, b);
    if (a.is_str || b.is_str)
        die_at(op, "operands of '%s' must be integers, not %s and %s",
               spelling[op->kind], type_name(a), type_name(b));
    switch (op->kind) {
    case T_PLUS: return num((long long)(x + y));
    case T_MINUS: return num((long long)(x - y));
    case T_STAR: return num((long long)(x * y));
    default:
        if (b.num == 0) die_at(op, "division by zero");
        if (a.num == LLONG_MIN && b.num == -1) die_at(op, "integer overflow");
        return num(op->kind == T_SLASH ? a.num / b.num : a.num % b.num);
    }
}

static Value term(int run)
{
    Value v = unary(run);
    while (check(T_STAR) || check(T_SLASH) || check(T_PERCENT)) {
        Token *op = &toks[pos++];
        Value r = unary(run);
        if (run) v = arith(op, v, r);
    }
    return v;
}

static Value sum(int run)
{
    Value v = term(run);
    while (check(T_PLUS) || check(T_MINUS)) {
        Token *op = &toks[pos++];
        Value r = term(run);
        if (run) v = arith(op, v, r);
    }
    return v;
}

/* Integers compare by value, strings by bytes; a string never equals an
 * integer, and ordering them is an error. */
static Value compare(const Token *op, Value a, Value b)
{
    int c;
    if (a.is_str != b.is_str) {
        if (op->kind == T_EQ || op->kind == T_NE) return num(op->kind == T_NE);
        die_at(op, "cannot compare %s with %s using '%s'", type_name(a), type_name(b),
               spelling[op->kind]);
    }
    c = a.is_str ? strcmp(a.str, b.str) : (a.num > b.num) - (a.num < b.num);
    switch (op->kind) {
    case T_EQ: return num(c == 0);
    case T_NE: return num(c != 0);
    case T_LT: return num(c < 0);
    case T_LE: return num(c <= 0);
    case T_GT: return num(c > 0);
    default: return num(c >= 0);
    }
}

static Value comparison(int run)
{
    Value v = sum(run);
    while (peek()->kind >= T_EQ && peek()->kind <= T_GE) {
        Token *op = &toks[pos++];
        Value r = sum(run);
        if (run) v = compare(op, v, r);
    }
    return v;
}

static Value negation(int run)
{
    Value v;
    if (!accept(T_NOT)) return comparison(run);
    v = negation(run);
    return num(!truthy(v));
}

/* `and` and `or` evaluate their right side only when it decides the result. */
static Value conjunction(int run)
{
    Value v = negation(run);
    while (accept(T_AND)) {
        int left = run && truthy(v);
        Value r = negation(left);
        if (run) v = num(left && truthy(r));
    }
    return v;
}

static Value expr(int run)
{
    Value v = conjunction(run);
    while (accept(T_OR)) {
        int left = run && truthy(v);
        Value r = conjunction(run && !left);
        if (run) v = num(left || truthy(r));
    }
    return v;
}

/* ------------------------------------------------------------- statements */

/* fn name(a, b) { ... } */
static void define(int run)
{
    Token *name = expect(T_NAME, "a function name");
    Func f = {NULL, {NULL}, 0, 0, NULL};
    f.name = name->text;
    expect(T_LPAREN, "'(' after the function name");
    if (!check(T_RPAREN)) {
        do {
            if (f.nparams == MAX_ARGS)
                die_at(peek(), "too many parameters (at most %d)", MAX_ARGS);
            f.params[f.nparams++] = expect(T_NAME, "a parameter name")->text;
        } while (accept(T_COMMA));
    }
    expect(T_RPAREN, "')' after the parameters");
    f.body = pos;
    block(0);
    if (!run) return;
    if (builtin_index(f.name) >= 0)
        die_at(name, "cannot redefine builtin function '%s'", f.name);
    if (find_func(f.name)) die_at(name, "function '%s' is already defined", f.name);
    f.next = funcs;
    funcs = xmalloc(sizeof *funcs);
    *funcs = f;
}

static void statement(int run)
{
    Token *t = peek();
    Value v;
    char buf[32];
    int taken;
    size_t cond;
    switch (t->kind) {
    case T_PRINT:
        pos++;
        do {
            v = expr(run);
            if (run) fputs(text(v, buf), stdout);
            if (run && check(T_COMMA)) putchar(' ');
        } while (accept(T_COMMA));
        if (run) putchar('\n');
        break;
    case T_IF:
        pos++;
        v = expr(run);
        taken = run && truthy(v);
        block(taken);
        if (accept(T_ELSE)) {
            if (check(T_IF))
                statement(run && !taken);
            else
                block(run && !taken);
        }
        break;
    case T_WHILE:
        pos++;
        cond = pos;
        for (;;) {
            pos = cond;
            v = expr(run);
            taken = run && truthy(v);
            block(taken);
            if (!taken || returning) break;
        }
        break;
    case T_FN: pos++; define(run); break;
    case T_RETURN:
        pos++;
        v = num(0);
        if (!check(T_RBRACE) && !check(T_SEMI) && !check(T_EOF)) v = expr(run);
        if (run) {
            if (!locals) die_at(t, "'return' outside a function");
            retval = v;
            returning = 1;
        }
        break;
    default:
        if (t->kind == T_NAME && toks[pos + 1].kind == T_ASSIGN) {
            pos += 2;
            v = expr(run);
            if (run) set_var(locals ? locals : &globals, t->text, v);
        } else {
            expr(run);   /* an expression statement, such as a call */
        }
    }
    accept(T_SEMI);
}

static void block(int run)
{
    Token *open = expect(T_LBRACE, "'{'");
    while (!accept(T_RBRACE)) {
        if (check(T_EOF)) die_at(open, "'{' is never closed");
        statement(run && !returning);
    }
}

/* ------------------------------------------------------------------- main */

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t len = 0, n;
    if (!f) fatal("cannot open ", path);
    do {
        buf = xrealloc(buf, len + 4096 + 1);
        len += n = fread(buf + len, 1, 4096, f);
    } while (n > 0);
    if (ferror(f)) fatal("cannot read ", path);
    fclose(f);
    buf[len] = '\0';
    if (strlen(buf) != len) die(path, 1, "file contains a NUL byte");
    return buf;
}

int main(int argc, char **argv)
{
    size_t *starts;
    int i;
    if (argc == 2 && !strcmp(argv[1], "--version")) {
        puts("tiny " TINY_VERSION);
        return 0;
    }
    for (i = 1; i < argc && argv[i][0] != '-'; i++)
        continue;
    if (argc < 2 || i < argc) {
        fputs("usage: tiny FILE...     run the files in order\n"
              "       tiny --version\n", stderr);
        return 2;
    }

    /* Read and parse every file before running any: a syntax error in the
     * last file is reported before the first one prints anything. */
    starts = xmalloc((size_t)argc * sizeof *starts);
    for (i = 1; i < argc; i++) {
        starts[i] = ntoks;
        lex(argv[i], read_file(argv[i]));
        for (pos = starts[i]; !check(T_EOF);) statement(0);
    }
    for (i = 1; i < argc; i++)
        for (pos = starts[i]; !check(T_EOF);) statement(1);
    free(starts);
    return 0;
}
