/* _spawn.c -- run one measured command for bench/run.py and report its rusage.
 *
 *     _spawn OUTFILE PROGRAM [ARG...]
 *
 * Forks, execs PROGRAM, wait4()s it and writes "STATUS UTIME STIME MAXRSS_KIB" to OUTFILE;
 * exits with the program's exit code (128+signal when killed).
 *
 * Why not os.wait4 straight from the Python runner: Linux starts a forked child's RSS
 * high-water mark from the pages it shares with its parent, and exec keeps that mark in
 * ru_maxrss, so every child of a 70 MiB Python process reports at least ~70 MiB even for
 * `true`.  Forking from this small process makes ru_maxrss the command's own.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s OUTFILE PROGRAM [ARG...]\n", argv[0]);
        return 127;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 127;
    }
    if (pid == 0) {
        execvp(argv[2], argv + 2);
        perror(argv[2]);
        _exit(127);
    }
    int st;
    struct rusage ru;
    while (wait4(pid, &st, 0, &ru) < 0) {
        if (errno != EINTR) {
            perror("wait4");
            return 127;
        }
    }
    FILE *f = fopen(argv[1], "w");
    if (f == NULL) {
        perror(argv[1]);
        return 127;
    }
    fprintf(f, "%d %ld.%06ld %ld.%06ld %ld\n", st, (long)ru.ru_utime.tv_sec,
            (long)ru.ru_utime.tv_usec, (long)ru.ru_stime.tv_sec, (long)ru.ru_stime.tv_usec,
            ru.ru_maxrss);
    if (fclose(f) != 0) {
        perror(argv[1]);
        return 127;
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
