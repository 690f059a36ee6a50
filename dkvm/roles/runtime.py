"""dkvm-runtime: the OCI runtime the engine calls. It edits what `create` and `exec`
are given, has SIGKILL and SIGSTOP delivered in the guest first (host.kill), refuses
an `update` to a memory limit below the VM's size (host.update), and then becomes
runc; every other subcommand reaches runc untouched. `create` waits for runc
instead, and puts the engine's config.json back once runc has read it; the `delete`
of a Kubernetes pod's sandbox waits for runc too, then removes the pod's directory
(host.pods).

Imports stay inside functions: this runs on every docker operation.
"""
import os


def main(argv):
    from dkvm.host import runc_cli
    call = runc_cli.parse(argv[1:])     # the one parse: every step below reads `call`
    created_from = None
    try:
        call.check()
        if call.command == "update":
            from dkvm.host.facts import find_runc
            from dkvm.host.update import guard_memory_limit
            guard_memory_limit(call, find_runc(call.runc))
        if call.command in ("create", "exec"):
            from dkvm import log
            log.set_container(call.container_id)
            from dkvm.host import bundle
            if call.command == "create":
                created_from = bundle.prepare_create(call)
            else:
                call.command_args = bundle.prepare_exec(call)
    except Exception as err:
        from dkvm import log
        runc_cli.report_to_runc_log(call, log.line(getattr(err, "message", None) or repr(err)))
        raise
    from dkvm.host.facts import find_runc
    runc = find_runc(call.runc)
    if call.command == "kill":
        from dkvm.host.kill import deliver_in_guest
        if not deliver_in_guest(call, runc):
            return 0
    if created_from:
        status = run_runc(runc, call.runc_args())
        from dkvm.host import bundle
        bundle.restore_config(*created_from)
        return status
    if call.command == "delete":
        from dkvm.host import pods
        if pods.has_pod_dir(call.container_id, call.log):
            return delete_pod(call, runc)
    os.execv(runc, [runc] + call.runc_args())


def delete_pod(call, runc):
    """runc's delete of a pod's sandbox, then its pod's directory: once runc's delete
    succeeds (`delete --force` of a container runc no longer has succeeds too, so the
    shim's cleanup after a failed create removes it as well), not while the sandbox
    may still run. Its members are gone by then (CRI removes them first)."""
    status = run_runc(runc, call.runc_args())
    if status == 0:
        from dkvm.errors import DkvmError
        from dkvm.host import pods
        try:
            pods.remove_pod_dir(call.container_id)
        except DkvmError as err:
            from dkvm import log
            from dkvm.host import runc_cli
            log.set_container(call.container_id)
            runc_cli.report_to_runc_log(call, log.line(err.message))
            raise
    return status


def run_runc(runc, args):
    """runc as our child, for what must follow it; its exit status, 128+N if killed."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(runc, [runc] + args)
        finally:
            os._exit(127)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code
