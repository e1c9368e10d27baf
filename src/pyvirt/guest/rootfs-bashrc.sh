# /etc/pyvirt/bashrc: the rc file of the shell /sbin/pyvirt-init runs on the console.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
PS1='# '
unset HISTFILE
cd /root 2>/dev/null
# Plain prompts for scripts: no bracketed-paste escapes around each one.
bind 'set enable-bracketed-paste off' 2>/dev/null
# pyvirt.noecho on the kernel command line: no echo (pyvirt-init also turned line
# editing off), so scripted input comes back as just the commands' output.
case " $(cat /proc/cmdline 2>/dev/null) " in *" pyvirt.noecho "*) stty -echo ;; esac
# Printed here, once the shell holds its tty open: input sent from this line on is kept
# in the tty's buffer until the shell reads it.
echo @READY_LINE@
